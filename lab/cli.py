"""balloonctl's `lab` and `experiment` commands (argument parsing and output only)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hostd.jsonout import dumps
from lab.runner import DEFAULT_CGROUP_NAME, DEFAULT_STATE_DIR, LabError, LabOptions
from lab.spec import DEFAULT_HOSTD_CONFIG, DEFAULT_LAB_FILE, Endpoints, LabSpecError, load_lab
from protocol.units import format_bytes, parse_duration_ms


def add_lab_parser(commands: Any) -> None:
    lab = commands.add_parser("lab", help="the lab without Docker: hostd and guests in memory cgroups (root)")
    lab_commands = lab.add_subparsers(dest="lab_command", required=True)
    for name, text in (("up", "start hostd and the guests, wait until all are registered"),
                       ("down", "stop everything the lab started and remove its cgroups"),
                       ("status", "the lab's processes and cgroups, and hostd's view")):
        command = lab_commands.add_parser(name, help=text)
        command.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                             help=f"where the lab keeps its state and logs (default {DEFAULT_STATE_DIR})")
        command.add_argument("--cgroup-name", default=DEFAULT_CGROUP_NAME,
                             help=f"parent memory cgroup of the guests (default {DEFAULT_CGROUP_NAME})")
        if name == "up":
            command.add_argument("--lab-file", type=Path, default=DEFAULT_LAB_FILE,
                                 help="guests: memory, swap, workload (default: the packaged lab/lab.toml)")
            command.add_argument("--hostd-config", type=Path, default=DEFAULT_HOSTD_CONFIG,
                                 help="hostd's TOML (default: the packaged lab/hostd.toml)")
            command.add_argument("--agent-endpoint", default="tcp://127.0.0.1:5555",
                                 help="where hostd listens for agents (default tcp://127.0.0.1:5555)")
            command.add_argument("--wait", default="60s", help="how long to wait for every guest to register")
        if name == "status":
            command.add_argument("--json", action="store_true")


def lab_options(args: argparse.Namespace) -> LabOptions:
    return LabOptions(state_dir=args.state_dir, cgroup_name=args.cgroup_name,
                      endpoints=Endpoints(getattr(args, "agent_endpoint", "tcp://127.0.0.1:5555"), args.endpoint),
                      wait_s=parse_duration_ms(getattr(args, "wait", "60s")) / 1000)


def run_lab(args: argparse.Namespace) -> str:
    from lab import runner

    def progress(line: str) -> None:
        print(f"lab: {line}", file=sys.stderr, flush=True)

    options = lab_options(args)
    try:
        if args.lab_command == "up":
            spec = load_lab(args.lab_file)
            state = runner.up(spec, args.hostd_config, options, progress)
            return (f"lab up: {len(state['guests'])} guests registered after {state['registered_after_s']} s; "
                    f"watch with `balloonctl --endpoint {options.endpoints.control} status`, stop with "
                    f"`balloonctl lab down`")
        if args.lab_command == "down":
            runner.down(options, progress)
            return ""
        report = runner.status(options)
        return dumps(report, indent=2) if args.json else render_lab_status(report)
    except (LabError, LabSpecError) as exc:
        from hostd.client import CtlError

        raise CtlError(str(exc)) from None


def render_lab_status(report: dict[str, Any]) -> str:
    from hostd.render import render_status

    lines = [f"hostd: {'running' if report['hostd_alive'] else 'NOT RUNNING'} ({report['control_endpoint']})"]
    security = report.get("security")
    if security:
        lines.append(f"security: agents over CurveZMQ, each key bound to its own vm id "
                     f"({security['agent_allowlist']}); changes need {security['control_token_file']}; "
                     "workloads unprivileged")
    lines.append(f"{'GUEST':<10} {'PID':>8} {'ALIVE':>5} {'MEMORY':>10} {'SWAP':>10} {'WORKLOAD UID:GID':>17}  CGROUP")
    for name, guest in report["guests"].items():
        lines.append(f"{name:<10} {guest['pid']:>8} {'yes' if guest['alive'] else 'no':>5} "
                     f"{format_bytes(guest['memory_bytes']):>10} {format_bytes(guest['swap_bytes']):>10} "
                     f"{guest.get('workload_user') or '-':>17}  {guest['cgroup']}")
    if report["hostd"]:
        lines += ["", render_status(report["hostd"])]
    return "\n".join(lines)


def add_experiment_parser(commands: Any) -> None:
    experiment = commands.add_parser("experiment", help="the paper's experiments on real guests (root, swap)")
    which = experiment.add_subparsers(dest="experiment", required=True)
    idle_tax = which.add_parser("idle-tax", help="Fig. 7: an idle and an active guest, τ=0 then τ=0.75")
    idle_tax.add_argument("--phase", default="90s", help="how long each τ runs (default 90s)")
    idle_tax.add_argument("--sample-period", default="10s", help="hostd's working-set sample period (default 10s)")
    idle_tax.add_argument("--host-memory", default="360MiB", help="memory the two guests share (default 360MiB)")
    idle_tax.add_argument("--vswap-mode", choices=("limit", "blind", "off"), default="limit",
                          help="host swap for what the balloon cannot take: limit (default), blind or off")
    overhead = which.add_parser("balloon-overhead", help="Fig. 2: ballooned down to X vs configured at X")
    overhead.add_argument("--sizes", default="448MiB,384MiB,320MiB,256MiB", help="the X values")
    overhead.add_argument("--measure", default="10s", help="throughput averaged over this long per X")
    versus = which.add_parser("balloon-vs-swap", help="the same memory taken by the balloon, blind host swap "
                              "and a lowered limit from a guest with a hot and a cold set")
    versus.add_argument("--take", default="96MiB", help="memory taken from the 256 MiB guest (default 96MiB)")
    versus.add_argument("--after", default="30s", help="how long each is watched once taken (default 30s)")
    versus.add_argument("--cold-kinds", default="anon,file", help="the cold set: anon, file (page cache) or both")
    versus.add_argument("--repeats", type=int, default=1, help="runs per cold kind, host methods' order alternating")
    versus.add_argument("--no-match", action="store_true",
                        help="skip the host runs that take exactly what the balloon held (the -eq rows)")
    estimator = which.add_parser("wss-estimator", help="the working-set estimator's response to a step up and down "
                                 "(pure computation over hostd's EWMAs, no guests)")
    estimator.add_argument("--sample-periods", default="5s,15s,60s", help="the sample periods compared")
    estimator.add_argument("--out", type=Path, default=Path("experiments"))
    for command in (idle_tax, overhead, versus):
        command.add_argument("--out", type=Path, default=Path("experiments"),
                             help="where the CSV, PNG and table go (default ./experiments)")
        command.add_argument("--state-dir", type=Path, default=Path("/run/balloonlab-experiment"))
        command.add_argument("--cgroup-name", default="balloonlab-experiment")
        command.add_argument("--agent-endpoint", default="tcp://127.0.0.1:5557")


def run_experiment(args: argparse.Namespace) -> str:
    from hostd.client import CtlError
    from lab import experiments
    from protocol.units import parse_size_bytes

    def progress(line: str) -> None:
        print(f"experiment: {line}", file=sys.stderr, flush=True)

    options = LabOptions(state_dir=args.state_dir, cgroup_name=args.cgroup_name,
                         endpoints=Endpoints(args.agent_endpoint, args.endpoint))
    try:
        if args.experiment == "wss-estimator":
            periods = tuple(parse_duration_ms(p) / 1000 for p in args.sample_periods.split(","))
            return experiments.run_estimator(experiments.EstimatorSetup(sample_periods_s=periods), args.out)
        if args.experiment == "balloon-vs-swap":
            versus = experiments.BalloonVsSwapSetup(take_bytes=parse_size_bytes(args.take),
                                                    after_s=parse_duration_ms(args.after) / 1000,
                                                    cold_kinds=tuple(args.cold_kinds.split(",")),
                                                    repeats=args.repeats, match_balloon=not args.no_match)
            if not 1 <= versus.repeats <= 20:
                raise CtlError("--repeats: 1..20", 2)
            if not set(versus.cold_kinds) <= {"anon", "file"}:
                raise CtlError("--cold-kinds: anon, file or anon,file", 2)
            return experiments.run_balloon_vs_swap(versus, args.out, options, progress)
        if args.experiment == "idle-tax":
            setup = experiments.IdleTaxSetup(phase_s=parse_duration_ms(args.phase) / 1000,
                                             sample_period_s=parse_duration_ms(args.sample_period) / 1000,
                                             host_memory_bytes=parse_size_bytes(args.host_memory),
                                             vswap_mode=args.vswap_mode)
            return experiments.run_idle_tax(setup, args.out, options, progress)
        sizes = tuple(parse_size_bytes(size) for size in args.sizes.split(","))
        overhead = experiments.OverheadSetup(sizes_bytes=sizes, measure_s=parse_duration_ms(args.measure) / 1000)
        if any(size > overhead.memsz_bytes or size < overhead.workload_bytes + (64 << 20) for size in sizes):
            raise CtlError(f"--sizes: each between {(overhead.workload_bytes >> 20) + 64} MiB and "
                           f"{overhead.memsz_bytes >> 20} MiB", 2)
        return experiments.run_balloon_overhead(overhead, args.out, options, progress)
    except (LabError, LabSpecError, RuntimeError) as exc:
        raise CtlError(str(exc)) from None
