"""balloonctl: read and change a running balloon-hostd.

    balloonctl status [--json]
    balloonctl top [-d 1s] [-b [-n N] [--csv]] [--sort name|memsz|mctlsz|swcur|actv|touch] [--unit GiB]
    balloonctl set VM shares=high reservation=128MiB limit=768MiB maxmemctl=256MiB  (value "default" resets)
    balloonctl host idle_tax=0.5 sample_period=10s balance_period=5s host_memory=1GiB ctl_max_percent=50
    balloonctl target VM 200MiB | auto        pin the balloon target (MCTLTGT), or back to the policy
    balloonctl keys generate NAME [--dir DIR] | allow PUBLIC_KEY_FILE --name NAME --allowlist DIR [--vm VM]
              | list --allowlist DIR | remove NAME --allowlist DIR
    balloonctl plot TIMELINE -o out.png      hostd --timeline file as charts
    balloonctl lab up|down|status            the lab without Docker (root; lab/lab.toml)
    balloonctl experiment idle-tax|balloon-overhead   the paper's Fig. 7 and Fig. 2 (table, CSV, PNG)
    balloonctl attach docker:NAME|cgroup:PATH|pid:PID [--vm-id VM] | detach VM   a balloon for any guest
    balloonctl run SCENARIO.toml             a scenario: verdicts, exit 0/1, JUnit XML, CSV, PNG
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from hostd.client import (
    DEFAULT_ENDPOINT,
    DEFAULT_TOKEN_FILE,
    ControlCredentials,
    CtlError,
    HostdClient,
    checked_reply,
    request,
)
from hostd.jsonout import dumps
from hostd.render import render_status
from hostd.status_doc import StatusDocument
from protocol import (
    ControlOk,
    GetStatus,
    Message,
    ProtocolError,
    SetHostParams,
    SetManualTarget,
    SetVmParams,
    StatusReply,
)
from protocol.limits import PAGE_SIZE_BYTES
from protocol.units import parse_duration_ms, parse_size_bytes

# ---- argument parsing ---------------------------------------------------------------------
_VM_KEYS = {"shares": "shares", "reservation": "reservation_bytes", "limit": "limit_bytes",
            "maxmemctl": "maxmemctl_bytes"}
_HOST_KEYS = {"idle_tax": "idle_tax_ratio", "sample_period": "sample_period_ms",
              "balance_period": "balance_period_ms", "host_memory": "host_memory_bytes",
              "ctl_max_percent": "ctl_max_percent"}


def _pairs(items: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise CtlError(f"{item!r}: expected KEY=VALUE", 2)
        pairs.append((key.strip(), value.strip()))
    return pairs


def parse_vm_params(items: Sequence[str]) -> dict[str, int | float | str | bool | None]:
    params: dict[str, int | float | str | bool | None] = {}
    for key, value in _pairs(items):
        if key not in _VM_KEYS:
            raise CtlError(f"unknown vm setting {key!r}; known: {', '.join(_VM_KEYS)}", 2)
        name = _VM_KEYS[key]
        if value == "default":
            params[name] = None
        elif key == "shares":
            params[name] = value if value in ("low", "normal", "high") else _int(key, value)
        else:
            params[name] = _size(key, value)
    return params


def parse_host_params(items: Sequence[str]) -> dict[str, int | float | str | bool | None]:
    params: dict[str, int | float | str | bool | None] = {}
    for key, value in _pairs(items):
        if key not in _HOST_KEYS:
            raise CtlError(f"unknown host setting {key!r}; known: {', '.join(_HOST_KEYS)}", 2)
        name = _HOST_KEYS[key]
        if value == "default":
            params[name] = None
        elif key == "idle_tax":
            try:
                params[name] = float(value.removesuffix("%")) / (100 if value.endswith("%") else 1)
            except ValueError:
                raise CtlError(f"idle_tax={value!r}: a number 0 ≤ τ < 1 (or a percentage like 75%)", 2) from None
        elif key.endswith("period"):
            try:
                params[name] = parse_duration_ms(value)
            except ValueError as exc:
                raise CtlError(f"{key}: {exc}", 2) from None
        elif key == "host_memory":
            params[name] = _size(key, value)
        else:
            params[name] = _int(key, value)
    return params


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise CtlError(f"{key}={value!r}: expected an integer", 2) from None


def _size(key: str, value: str) -> int:
    try:
        return parse_size_bytes(value)
    except ValueError as exc:
        raise CtlError(f"{key}: {exc}", 2) from None


# ---- commands -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="balloonctl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", default=os.environ.get("BALLOONLAB_CONTROL_ENDPOINT", DEFAULT_ENDPOINT),
                        help=f"hostd control endpoint (default {DEFAULT_ENDPOINT})")
    parser.add_argument("--timeout", default="3s", help="how long to wait for hostd (default 3s)")
    parser.add_argument("--token-file", help="hostd's control token, needed for changes (default "
                        f"$BALLOONLAB_CONTROL_TOKEN_FILE or {DEFAULT_TOKEN_FILE})")
    parser.add_argument("--key", help="an operator's .key_secret when hostd's control socket uses CURVE "
                        "(default $BALLOONLAB_CONTROL_KEY)")
    parser.add_argument("--server-key", help="hostd's public .key for --key (default $BALLOONLAB_CONTROL_SERVER_KEY)")
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="host and per-vm memory figures")
    status.add_argument("--json", action="store_true", help="the full document (stable field names)")
    status.add_argument("--unit", choices=("MiB", "GiB"), default="MiB")
    top = commands.add_parser("top", help="live esxtop-style memory view (-b for batch mode)")
    top.add_argument("-d", "--delay", default="1s", help="refresh period (default 1s)")
    top.add_argument("-b", "--batch", action="store_true", help="print snapshots as text instead of a live view")
    top.add_argument("-n", "--iterations", type=int, default=0, help="stop after N snapshots (default: never)")
    top.add_argument("--csv", action="store_true", help="batch mode as CSV (one header, one row per vm)")
    top.add_argument("--sort", choices=("name", "memsz", "mctlsz", "swcur", "actv", "touch"), default="name")
    top.add_argument("--unit", choices=("MiB", "GiB"), default="MiB")
    plot = commands.add_parser("plot", help="render a hostd --timeline file as PNG charts")
    plot.add_argument("timeline", type=Path)
    plot.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    vm_set = commands.add_parser("set", help="change a vm's shares/reservation/limit/maxmemctl")
    vm_set.add_argument("vm")
    vm_set.add_argument("settings", nargs="+", metavar="KEY=VALUE")
    host = commands.add_parser("host", help="change host settings (idle_tax, periods, host_memory, ctl_max_percent)")
    host.add_argument("settings", nargs="+", metavar="KEY=VALUE")
    target = commands.add_parser("target", help="pin a vm's balloon target, or 'auto'")
    target.add_argument("vm")
    target.add_argument("size", help="e.g. 200MiB, or auto")
    from lab.cli import add_experiment_parser, add_lab_parser

    add_lab_parser(commands)
    add_experiment_parser(commands)
    from balloonlab.cli import add_tool_parsers

    add_tool_parsers(commands)
    keys = commands.add_parser("keys", help="CurveZMQ key files and the agent allowlist")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    generate = key_commands.add_parser("generate", help="write NAME.key and NAME.key_secret")
    generate.add_argument("name")
    generate.add_argument("--dir", default=".", help="directory (default .)")
    allow = key_commands.add_parser("allow", help="add an agent's public key to the allowlist")
    allow.add_argument("public_key_file")
    allow.add_argument("--name", required=True)
    allow.add_argument("--allowlist", required=True)
    allow.add_argument("--vm", action="append", default=[], metavar="VM_ID",
                       help="a vm id this key may register (repeat for several; default: the vm called NAME); "
                       "ignored in an operator allowlist")
    listing = key_commands.add_parser("list", help="list allowed agent keys")
    listing.add_argument("--allowlist", required=True)
    remove = key_commands.add_parser("remove", help="remove an agent from the allowlist")
    remove.add_argument("name")
    remove.add_argument("--allowlist", required=True)
    return parser


def run(args: argparse.Namespace) -> str:
    if args.command == "keys":
        return run_keys(args)
    if args.command == "lab":
        from lab.cli import run_lab

        return run_lab(args)
    if args.command == "experiment":
        from lab.cli import run_experiment

        return run_experiment(args)
    if args.command in ("attach", "detach", "run"):
        from balloonlab.cli import run_tool

        return run_tool(args)
    timeout_ms = parse_duration_ms(args.timeout)
    if args.command == "top":
        return run_top_command(args, timeout_ms)
    if args.command == "plot":
        return run_plot(args)
    if args.command == "status":
        reply = checked_reply(request(args.endpoint, GetStatus(), timeout_ms, _credentials(args)))
        assert isinstance(reply, StatusReply)
        document = cast(StatusDocument, reply.snapshot)
        return dumps(reply.snapshot, indent=2) if args.json else render_status(document, args.unit)
    message: Message
    if args.command == "set":
        message = SetVmParams(vm_id=args.vm, params=parse_vm_params(args.settings))
    elif args.command == "host":
        message = SetHostParams(params=parse_host_params(args.settings))
    else:
        pages = None if args.size == "auto" else _size("size", args.size) // PAGE_SIZE_BYTES
        message = SetManualTarget(vm_id=args.vm, balloon_target_pages=pages)
    reply = checked_reply(request(args.endpoint, message, timeout_ms, _credentials(args)))
    assert isinstance(reply, ControlOk)
    return reply.detail


def _credentials(args: argparse.Namespace) -> ControlCredentials:
    return ControlCredentials.from_environment(args.token_file, args.key, args.server_key)


def run_top_command(args: argparse.Namespace, timeout_ms: int) -> str:
    from hostd import top

    if args.iterations < 0:
        raise CtlError("-n must be ≥ 0 (0 = until interrupted)", 2)
    sort_key = {"name": "n", "memsz": "m", "mctlsz": "b", "swcur": "s", "actv": "a", "touch": "t"}[args.sort]

    client = HostdClient(args.endpoint, timeout_ms, _credentials(args))

    with contextlib.suppress(KeyboardInterrupt):
        top.run_top(client.status, parse_duration_ms(args.delay) / 1000, args.iterations, args.batch, args.csv,
                    args.unit, sort_key, lambda text: print(text, flush=True))
    return ""


def run_plot(args: argparse.Namespace) -> str:
    from hostd.timeline import TimelineError, read_timeline

    try:
        with open(args.timeline) as lines:
            timeline = read_timeline(lines, str(args.timeline))
    except OSError as exc:
        raise CtlError(f"cannot read {args.timeline}: {exc.strerror}") from None
    except TimelineError as exc:
        raise CtlError(str(exc)) from None
    from lab.plots import plot_timeline

    try:
        series = plot_timeline(timeline, args.output, f"{args.timeline.name}: {len(timeline.vms)} vms")
    except (RuntimeError, OSError) as exc:
        raise CtlError(str(exc)) from None
    return (f"wrote {args.output}: {len(timeline.vms)} vms, {series} series, "
            f"{timeline.times_s[-1] - timeline.times_s[0]:.0f} s, {len(timeline.events)} events")


def run_keys(args: argparse.Namespace) -> str:
    from protocol import keys

    try:
        if args.keys_command == "generate":
            public, secret = keys.generate_keypair(Path(args.dir), args.name)
            return f"wrote {public} (public: give it to the peer) and {secret} (secret: keep it, mode 0600)"
        if args.keys_command == "allow":
            target = keys.allowlist_add(Path(args.allowlist), Path(args.public_key_file), args.name,
                                        tuple(args.vm))
            return f"allowed {args.name} for vm {', '.join(args.vm or [args.name])}: {target}"
        if args.keys_command == "remove":
            keys.allowlist_remove(Path(args.allowlist), args.name)
            return f"removed {args.name}"
        allowed = keys.allowlist_entries(Path(args.allowlist))
        return "\n".join(f"{name}  {entry.public_key.decode()}  vm {','.join(sorted(entry.vm_ids))}"
                         for name, entry in allowed.items()) or "(allowlist is empty)"
    except keys.KeyFileError as exc:
        raise CtlError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        output = run(args)
        if output:
            print(output)
    except ProtocolError as exc:  # a request that cannot even be built (e.g. a bad vm id)
        print(f"balloonctl: {exc.detail}", file=sys.stderr)
        return 2
    except CtlError as exc:
        print(f"balloonctl: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:
        print(f"balloonctl: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
