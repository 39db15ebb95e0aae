"""Agent configuration: defaults in code < BALLOONLAB_* environment < command-line flags."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from protocol.errors import ProtocolError
from protocol.limits import DEFAULT_BATCH_LIMIT_PAGES, MAX_PAGES_PER_MESSAGE
from protocol.messages import check_vm_id
from protocol.units import parse_bool, parse_duration_ms, parse_size_bytes


class ConfigError(Exception):
    """A setting is invalid; the message names it and says what is allowed."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    host_endpoint: str = "tcp://127.0.0.1:5555"
    vm_id: str = ""
    cgroup_path: Path | None = None  # default: this process's own memory cgroup
    memsz_bytes: int | None = None  # default: the cgroup's memory limit
    batch_pages: int = DEFAULT_BATCH_LIMIT_PAGES
    report_interval_ms: int = 1_000
    check_interval_ms: int = 100  # guest pressure is checked this often while ballooned
    host_grace_ms: int = 30_000  # host silent this long (after its timeout) → deflate gradually
    lost_deflate_pages_per_s: int = 16_384  # 64 MiB/s when deflating without a host
    ws_period_ms: int = 10_000
    want_pfn: bool = True
    huge_pages: bool = False
    curve_server_public_key: Path | None = None
    curve_client_key: Path | None = None  # a .key_secret file
    workload_report: Path | None = None  # balloon-workload's --report-file: forwarded in status
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        try:
            check_vm_id(self.vm_id)
        except ProtocolError as exc:
            raise ConfigError(f"vm_id: {exc.detail} (set --vm-id or BALLOONLAB_VM_ID)") from None
        if not 1 <= self.batch_pages <= MAX_PAGES_PER_MESSAGE:
            raise ConfigError(f"batch_pages={self.batch_pages} must be 1..{MAX_PAGES_PER_MESSAGE}")
        for name in ("report_interval_ms", "check_interval_ms", "host_grace_ms", "ws_period_ms"):
            if getattr(self, name) < 10:
                raise ConfigError(f"{name} must be ≥ 10 ms")
        if self.curve_client_key is not None and self.curve_server_public_key is None:
            # The host's key is pinned: an agent that would take any server's key has no way
            # to tell its host from anything else listening at the endpoint.
            raise ConfigError("CurveZMQ: --curve-client-key is set but --curve-server-public-key is not; the agent "
                              "talks only to the host whose public key it was given (pinned) and will not start "
                              "without it (BALLOONLAB_CURVE_SERVER_PUBLIC_KEY)")
        if self.curve_server_public_key is not None and self.curve_client_key is None:
            raise ConfigError("CurveZMQ: --curve-server-public-key is set but --curve-client-key is not "
                              "(this agent's .key_secret file, BALLOONLAB_CURVE_CLIENT_KEY)")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level {self.log_level!r} must be DEBUG, INFO, WARNING or ERROR")


_CONVERTERS: dict[str, Callable[[str], object]] = {
    "cgroup_path": Path,
    "curve_server_public_key": Path,
    "curve_client_key": Path,
    "workload_report": Path,
    "memsz_bytes": parse_size_bytes,
    "batch_pages": int,
    "lost_deflate_pages_per_s": int,
    "report_interval_ms": parse_duration_ms,
    "check_interval_ms": parse_duration_ms,
    "host_grace_ms": parse_duration_ms,
    "ws_period_ms": parse_duration_ms,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balloon-agent",
        description="The guest's balloon driver: pins real pages when balloon-hostd asks, and gives them back "
        "when the guest needs them. Every flag has a BALLOONLAB_<NAME> environment variable.",
    )
    parser.add_argument("--host-endpoint", help="hostd's agent endpoint (default tcp://127.0.0.1:5555)")
    parser.add_argument("--vm-id", help="this guest's id, unique per host (required)")
    parser.add_argument("--cgroup-path", help="memory cgroup directory (default: the agent's own cgroup)")
    parser.add_argument("--memsz", dest="memsz_bytes", help="guest memory size, e.g. 512MiB (default: cgroup limit)")
    parser.add_argument("--batch-pages", help="pages per lock batch (default 512)")
    parser.add_argument("--report-interval", dest="report_interval_ms", help="status period, e.g. 1s")
    parser.add_argument("--check-interval", dest="check_interval_ms", help="pressure check period, e.g. 100ms")
    parser.add_argument("--host-grace", dest="host_grace_ms", help="deflate after the host is gone this long")
    parser.add_argument("--ws-period", dest="ws_period_ms", help="working-set sampling period, e.g. 10s")
    parser.add_argument("--want-pfn", help="report real PFNs when permitted (true/false, default true)")
    parser.add_argument("--huge-pages", help="pin 2 MiB THP batches when available (true/false)")
    parser.add_argument("--curve-server-public-key", help="hostd's public key file (enables CurveZMQ)")
    parser.add_argument("--curve-client-key", help="this agent's .key_secret file")
    parser.add_argument("--workload-report", help="a balloon-workload --report-file to forward to hostd")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    return parser


def load_config(argv: Sequence[str] | None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    environ = os.environ if environ is None else environ
    parser = build_parser()
    flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    args = vars(parser.parse_args(argv))
    values: dict[str, object] = {}
    for field in fields(AgentConfig):
        raw = args.get(field.name)
        source = flags.get(field.name, field.name)  # the flag as the user typed it: --memsz, not --memsz-bytes
        if raw is None:
            env_name = "BALLOONLAB_" + field.name.upper().removesuffix("_MS").removesuffix("_BYTES")
            raw = environ.get(env_name)
            source = env_name
        if raw is None:
            continue
        try:
            if field.name in _CONVERTERS:
                values[field.name] = _CONVERTERS[field.name](raw)
            elif field.type in ("bool", bool):
                values[field.name] = parse_bool(raw)
            else:
                values[field.name] = raw
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return AgentConfig(**values)  # type: ignore[arg-type]
