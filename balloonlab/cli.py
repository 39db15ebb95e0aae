"""balloonctl's `attach`, `detach` and `run` commands (argument parsing and output only; the
work is guestagent/attach.py and balloonlab/scenario_run.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

TOOL_COMMANDS = ("attach", "detach", "run")


def add_tool_parsers(commands: Any) -> None:
    from guestagent import attach

    attach_parser = commands.add_parser(
        "attach", help="a balloon for a container/cgroup/process without an agent (root; runs until detached)")
    attach.add_arguments(attach_parser)
    detach = commands.add_parser("detach", help="stop an attached agent: it deflates and leaves the guest")
    detach.add_argument("vm")
    detach.add_argument("--state-dir", type=Path, default=attach.DEFAULT_STATE_DIR,
                        help=f"where attached vms are recorded (default {attach.DEFAULT_STATE_DIR})")
    run = commands.add_parser("run", help="run a scenario file: verdict per assertion, JUnit XML, CSV, PNG")
    run.add_argument("scenario", type=Path)
    run.add_argument("--out", type=Path, help="where results go (default ./scenario-results/NAME)")
    run.add_argument("--junit", type=Path, help="JUnit XML file (default OUT/junit.xml)")


def run_tool(args: argparse.Namespace) -> str:
    from hostd.client import CtlError

    if args.command == "run":
        from balloonlab.scenario import ScenarioError
        from balloonlab.scenario_run import run_file

        try:
            result = run_file(args.scenario, args.out, args.junit,
                              progress=lambda line: print(f"run: {line}", file=sys.stderr, flush=True))
        except ScenarioError as exc:
            raise CtlError(str(exc), 2) from None
        if not result.passed:
            print(result.report)
            raise CtlError(f"{result.failed_count} of {len(result.verdicts)} assertions failed "
                           f"(JUnit: {result.junit_path})")
        return str(result.report)

    from guestagent import attach

    try:
        if args.command == "detach":
            return attach.detach(args.vm, args.state_dir)
        code = attach.run_attached(attach.resolve(args.target), attach.options_from(args),
                                   on_started=lambda line: print(line, file=sys.stderr, flush=True))
    except attach.AttachError as exc:
        raise CtlError(str(exc)) from None
    if code:
        raise CtlError(f"the agent exited with code {code}", code)
    return ""
