"""hostd configuration: defaults in code < TOML file < BALLOONLAB_* environment < flags.

The sample with every key explained is `hostd/balloonlab.sample.toml`. Invalid values raise
ConfigError naming the key and what is allowed; nothing is half-applied.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from protocol.messages import SHARE_LEVELS, check_vm_id
from protocol.units import parse_bool, parse_duration_ms, parse_size_bytes

VSWAP_MODES = ("limit", "blind")


class ConfigError(Exception):
    """A setting is invalid; the message names it."""


@dataclass(frozen=True, slots=True)
class VmParams:
    """Per-vm settings: known before the vm registers (the `[vms.NAME]` tables), then changed by
    `balloonctl set` (the live `vm.params`)."""

    shares: int | str = "normal"
    reservation_bytes: int = 0
    limit_bytes: int | None = None  # None = memsz
    maxmemctl_bytes: int | None = None  # None = only the host's ctl_max_percent cap


@dataclass(frozen=True, slots=True)
class HostConfig:
    agent_endpoint: str = "tcp://127.0.0.1:5555"
    control_endpoint: str = "tcp://127.0.0.1:5556"
    http_address: str = "127.0.0.1:8055"  # /metrics and /status.json; "off" for none
    host_memory_bytes: int = 0  # 0 = this machine's RAM
    idle_tax_ratio: float = 0.75
    ctl_max_percent: int = 65
    sample_period_ms: int = 60_000
    balance_period_ms: int = 15_000
    report_interval_ms: int = 1_000
    lost_after_reports: int = 3
    batch_limit_pages: int = 512
    sliding_min_free: bool = False
    event_log: Path | None = None
    timeline: Path | None = None  # JSON Lines of every sample (1/s) and decision, for balloonctl plot
    curve_secret_key: Path | None = None
    curve_allowlist: Path | None = None  # agents' public keys, each bound to the vm ids it may register
    # The control plane's own authority (every change needs one; reading status does not):
    # CURVE operators' public keys on the control socket, or else the token in this file
    # (created 0600 at start when missing), or an ipc:// control endpoint (its file mode).
    control_allowlist: Path | None = None
    control_token_file: Path = Path("/run/balloonlab/control.token")
    control_socket_mode: int = 0o600  # an ipc:// control endpoint's file mode (0o660 with a group)
    control_socket_group: str = ""  # and its group, e.g. "balloonlab"
    settings_file: Path | None = Path("/run/balloonlab/hostd-settings.json")  # balloonctl changes, kept across restarts
    allow_plain_remote: bool = False
    # Bounded state: whatever peers send, hostd's tables stay this small.
    max_vms: int = 10_000  # registered vms, alive or waiting to expire
    dead_vm_ttl_ms: int = 120_000  # a vm that left or was lost is forgotten after this long
    max_joins_per_s: int = 200  # new vm ids per second (re-registrations of known vms are not counted)
    log_level: str = "INFO"
    # Host-level reclamation (hostd/vswap.py): vms whose cgroup hostd may limit and freeze.
    vswap: bool = True  # apply swap targets to vms with a `cgroup` by lowering its limit
    vswap_step_bytes: int = 64 << 20  # per second, down or up
    # "limit": lower the cgroup's limit, the guest's own kernel LRU picks the pages; "blind":
    # hostd picks random resident pages itself (process_madvise MADV_PAGEOUT, hostd/pageout.py)
    # and then holds the limit there, as ESX's host swapping does.
    vswap_mode: str = "limit"
    block_max_ms: int = 10_000  # longest freeze in the low state; 0 = never freeze
    vswap_state_file: Path = Path("/run/balloonlab/hostd-vswap.json")  # lowered limits and freezes to undo
    # Reclaim mode (off by default): the agent of a vm with a host target hands its balloon's
    # memory back and hostd lowers the guest's limit by the balloon, so ballooning frees RAM on
    # the host (not only in the ledger).
    reclaim_mode: bool = False
    cgroup_root: Path = Path("/sys/fs/cgroup")
    docker_label: str = ""  # e.g. "balloonlab.vm": containers labelled balloonlab.vm=VM are that vm's
    docker_label_filter: str = ""  # and, when set, also carry this "key=value" label (one lab of several)
    vms: Mapping[str, VmParams] = field(default_factory=dict)
    vm_cgroups: Mapping[str, str] = field(default_factory=dict)  # vm → cgroup path below the hierarchy
    vm_containers: Mapping[str, str] = field(default_factory=dict)  # vm → Docker container name or id

    def __post_init__(self) -> None:
        if not 0.0 <= self.idle_tax_ratio < 1.0:
            raise ConfigError(f"idle_tax_ratio={self.idle_tax_ratio}: must satisfy 0 ≤ τ < 1")
        if not 0 <= self.ctl_max_percent <= 99:
            raise ConfigError(f"ctl_max_percent={self.ctl_max_percent}: must be 0..99")
        for name in ("sample_period_ms", "balance_period_ms", "report_interval_ms"):
            if not 10 <= getattr(self, name) <= 86_400_000:
                raise ConfigError(f"{name}={getattr(self, name)}: must be 10 ms .. 1 day")
        if self.host_memory_bytes < 0:
            raise ConfigError("host_memory_bytes must be ≥ 0 (0 = this machine's RAM)")
        if not 1 <= self.lost_after_reports <= 100:
            raise ConfigError("lost_after_reports must be 1..100")
        if not 1 << 20 <= self.vswap_step_bytes <= 1 << 40:
            raise ConfigError("vswap_step_bytes must be 1 MiB .. 1 TiB")
        if self.vswap_mode not in VSWAP_MODES:
            raise ConfigError(f"vswap_mode={self.vswap_mode!r}: {' or '.join(VSWAP_MODES)}")
        if self.block_max_ms != 0 and not 100 <= self.block_max_ms <= 600_000:
            raise ConfigError("block_max_ms must be 100 ms .. 10 min, or 0 for no blocking")
        both = sorted(set(self.vm_cgroups) & set(self.vm_containers))
        if both:
            raise ConfigError(f"[vms.{both[0]}]: give a cgroup or a container, not both")
        for vm_id, cgroup in self.vm_cgroups.items():
            if not cgroup.strip("/") or ".." in Path(cgroup).parts:
                raise ConfigError(f"[vms.{vm_id}] cgroup={cgroup!r}: a path below the cgroup hierarchy's root")
        if not 1 <= self.batch_limit_pages <= 1 << 20:
            raise ConfigError("batch_limit_pages must be 1..1048576")
        if (self.curve_secret_key is None) != (self.curve_allowlist is None):
            raise ConfigError("CurveZMQ needs both curve_secret_key and curve_allowlist")
        if self.control_allowlist is not None and self.curve_secret_key is None:
            raise ConfigError("control_allowlist (CURVE operators) needs curve_secret_key and curve_allowlist")
        if self.control_allowlist is None and not is_loopback_endpoint(self.control_endpoint):
            # Whatever else is configured: a plain control socket off loopback is reachable by
            # the guests it controls.
            raise ConfigError(f"control_endpoint={self.control_endpoint}: a plain control endpoint must be on "
                              "loopback or ipc://; for remote control set control_allowlist (CURVE operators)")
        if not 0 <= self.control_socket_mode <= 0o777 or self.control_socket_mode & 0o007:
            raise ConfigError(f"control_socket_mode={oct(self.control_socket_mode)}: owner/group bits only "
                              "(e.g. 0o600 or 0o660)")
        if not 1 <= self.max_vms <= 1_000_000:
            raise ConfigError("max_vms must be 1..1000000")
        if not 1_000 <= self.dead_vm_ttl_ms <= 86_400_000:
            raise ConfigError("dead_vm_ttl_ms must be 1 s .. 1 day")
        if not 1 <= self.max_joins_per_s <= 1_000_000:
            raise ConfigError("max_joins_per_s must be 1..1000000")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level {self.log_level!r}: DEBUG, INFO, WARNING or ERROR")
        try:
            http = parse_http_address(self.http_address)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if http is not None and not self.allow_plain_remote and not _is_loopback_host(http[0]):
            raise ConfigError(f"http_address={self.http_address}: only loopback unless allow_plain_remote = true "
                              "(the port shows every guest's figures)")
        if self.curve_secret_key is None and not self.allow_plain_remote and not is_loopback_endpoint(
                self.agent_endpoint):
            raise ConfigError(
                f"agent_endpoint={self.agent_endpoint}: plain TCP is only allowed on loopback; configure CurveZMQ "
                "(curve_secret_key + curve_allowlist) or set allow_plain_remote = true")

    @property
    def host_targets(self) -> dict[str, str]:
        """vm → what the host backend acts on: a cgroup path, or "docker:NAME"."""
        return {**self.vm_cgroups, **{vm: f"docker:{name}" for vm, name in self.vm_containers.items()}}

    @property
    def effective_host_memory_bytes(self) -> int:
        return self.host_memory_bytes or psutil.virtual_memory().total


def parse_http_address(text: str) -> tuple[str, int] | None:
    """"127.0.0.1:8055" → ("127.0.0.1", 8055); "" or "off" → None (no HTTP port)."""
    if text.strip().lower() in ("", "off", "none"):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"http_address {text!r}: HOST:PORT, e.g. 127.0.0.1:8055 (or off)")
    return host.strip("[]") or "0.0.0.0", int(port)


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_endpoint(endpoint: str) -> bool:
    """tcp://127.x / [::1] / localhost, or ipc:// / inproc:// (local by construction)."""
    scheme = endpoint.split("://", 1)[0]
    if scheme in ("ipc", "inproc"):
        return True
    return _is_loopback_host(urlsplit(endpoint).hostname or "")


_SIZE_KEYS = {"host_memory_bytes", "vswap_step_bytes"}
_DURATION_KEYS = {"sample_period_ms", "balance_period_ms", "report_interval_ms", "block_max_ms", "dead_vm_ttl_ms"}
_PATH_KEYS = {"event_log", "timeline", "curve_secret_key", "curve_allowlist", "vswap_state_file", "cgroup_root",
              "control_allowlist", "control_token_file"}
_OPTIONAL_PATH_KEYS = {"settings_file"}  # "" or "off" = none


def _convert(name: str, value: Any, source: str | None = None) -> Any:
    """`source` names where the value came from in an error (a flag, an env var, a file's key)."""
    kind = next(f.type for f in fields(HostConfig) if f.name == name)
    try:
        if name in _SIZE_KEYS:
            return value if isinstance(value, int) else parse_size_bytes(str(value))
        if name in _DURATION_KEYS:
            return value if isinstance(value, int) else parse_duration_ms(str(value))
        if name in _PATH_KEYS:
            return Path(str(value))
        if name in _OPTIONAL_PATH_KEYS:
            return None if str(value).strip().lower() in ("", "off", "none") else Path(str(value))
        if name == "control_socket_mode":
            return value if isinstance(value, int) else int(str(value), 8)
        if kind == "bool":
            return value if isinstance(value, bool) else parse_bool(str(value))
        if kind == "float":
            return float(value)
        if kind == "int":
            return int(value)
        return str(value)
    except ValueError as exc:
        raise ConfigError(f"{source or name}: {exc}") from None


def _vm_params(name: str, table: Mapping[str, Any]) -> VmParams:
    try:
        check_vm_id(name)
    except Exception:
        raise ConfigError(f"[vms.{name}]: not a valid vm id") from None
    allowed = {"shares", "reservation", "limit", "maxmemctl", "cgroup", "container"}
    unknown = set(table) - allowed
    if unknown:
        raise ConfigError(f"[vms.{name}]: unknown keys {sorted(unknown)}; known: {sorted(allowed)}")
    shares = table.get("shares", "normal")
    if isinstance(shares, str) and shares not in SHARE_LEVELS:
        raise ConfigError(f"[vms.{name}] shares={shares!r}: low, normal, high or an integer ≥ 0")
    if isinstance(shares, int) and shares < 0:
        raise ConfigError(f"[vms.{name}] shares must be ≥ 0")

    def size(key: str) -> int | None:
        if key not in table:
            return None
        try:
            return parse_size_bytes(str(table[key]))
        except ValueError as exc:
            raise ConfigError(f"[vms.{name}] {key}: {exc}") from None

    return VmParams(shares=shares, reservation_bytes=size("reservation") or 0, limit_bytes=size("limit"),
                      maxmemctl_bytes=size("maxmemctl"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balloon-hostd",
        description="The host daemon: the VMkernel's memory scheduler for balloonlab guests. "
        "Settings: defaults < --config TOML < BALLOONLAB_<KEY> environment < flags.",
    )
    parser.add_argument("--config", help="TOML file (see hostd/balloonlab.sample.toml)")
    parser.add_argument("--agent-endpoint", help="ROUTER for agents (default tcp://127.0.0.1:5555)")
    parser.add_argument("--control-endpoint", help="ROUTER for balloonctl (default tcp://127.0.0.1:5556)")
    parser.add_argument("--http", dest="http_address",
                        help="HOST:PORT for /metrics and /status.json (default 127.0.0.1:8055; off for none)")
    parser.add_argument("--host-memory", dest="host_memory_bytes", help="memory budget, e.g. 1GiB (default: RAM)")
    parser.add_argument("--idle-tax", dest="idle_tax_ratio", help="τ, 0 ≤ τ < 1 (default 0.75)")
    parser.add_argument("--ctl-max-percent", help="balloon cap in %% of memsz (default 65)")
    parser.add_argument("--sample-period", dest="sample_period_ms", help="working-set period (default 60s)")
    parser.add_argument("--balance-period", dest="balance_period_ms", help="recompute period (default 15s)")
    parser.add_argument("--report-interval", dest="report_interval_ms", help="agent status period (default 1s)")
    parser.add_argument("--sliding-min-free", help="vSphere 5 sliding-scale minFree (true/false)")
    parser.add_argument("--event-log", help="JSON Lines file of decisions and events")
    parser.add_argument("--timeline", help="JSON Lines file of every sample and decision (balloonctl plot)")
    parser.add_argument("--curve-secret-key", help="hostd's .key_secret file (enables CurveZMQ)")
    parser.add_argument("--curve-allowlist", help="directory of allowed agent public keys")
    parser.add_argument("--control-allowlist", help="directory of operators' public keys (CURVE on the control "
                        "socket; needs --curve-secret-key)")
    parser.add_argument("--control-token-file", help="the control token balloonctl must present for changes "
                        "(created 0600 when missing; default /run/balloonlab/control.token)")
    parser.add_argument("--settings-file", help="balloonctl changes kept across restarts "
                        "(default /run/balloonlab/hostd-settings.json; off for none)")
    parser.add_argument("--max-vms", help="most vms hostd keeps (default 10000)")
    parser.add_argument("--dead-vm-ttl", dest="dead_vm_ttl_ms", help="forget vms that left after (default 120s)")
    parser.add_argument("--max-joins-per-s", help="new vm ids accepted per second (default 200)")
    parser.add_argument("--allow-plain-remote", help="allow plain TCP on non-loopback addresses (true/false)")
    parser.add_argument("--vswap", help="apply swap targets to vms with a cgroup (true/false, default true)")
    parser.add_argument("--vswap-step", dest="vswap_step_bytes", help="limit change per second (default 64MiB)")
    parser.add_argument("--vswap-mode", help="limit (lower the cgroup's limit: the guest's LRU picks the pages, "
                        "default) or blind (hostd pages out random resident pages itself, then holds the limit)")
    parser.add_argument("--block-max", dest="block_max_ms",
                        help="longest freeze in the low state (default 10s; 0 = never freeze)")
    parser.add_argument("--vswap-state-file", help="where lowered limits and freezes are recorded for recovery "
                        "(default /run/balloonlab/hostd-vswap.json)")
    parser.add_argument("--reclaim-mode", help="balloons free real host memory: agents of vms with a cgroup or "
                        "container hand it back, hostd lowers their limit by it (true/false, default false)")
    parser.add_argument("--docker-label", help="containers labelled LABEL=VM_ID are that vm's (e.g. balloonlab.vm)")
    parser.add_argument("--docker-label-filter", help="and must also carry this key=value label")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    return parser


def load_config(argv: Sequence[str] | None, environ: Mapping[str, str] | None = None) -> HostConfig:
    environ = os.environ if environ is None else environ
    parser = build_parser()
    flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_path = args.pop("config", None) or environ.get("BALLOONLAB_CONFIG")
    if config_path:
        try:
            document = tomllib.loads(Path(config_path).read_text())
        except OSError as exc:
            raise ConfigError(f"config file {config_path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_path}: {exc}") from None
        vm_tables = document.pop("vms", {})
        known = {f.name for f in fields(HostConfig)} - {"vms", "vm_cgroups", "vm_containers"}
        unknown = set(document) - known
        if unknown:
            raise ConfigError(f"config file {config_path}: unknown keys {sorted(unknown)}")
        values.update({name: _convert(name, value, f"config file {config_path}: {name}")
                       for name, value in document.items()})
        values["vms"] = {name: _vm_params(name, table) for name, table in vm_tables.items()}
        values["vm_cgroups"] = {name: str(table["cgroup"]) for name, table in vm_tables.items() if "cgroup" in table}
        values["vm_containers"] = {name: str(table["container"]) for name, table in vm_tables.items()
                                   if "container" in table}
    for f in fields(HostConfig):
        if f.name in ("vms", "vm_cgroups", "vm_containers"):
            continue
        env_name = "BALLOONLAB_" + f.name.upper().removesuffix("_MS").removesuffix("_BYTES").removesuffix("_RATIO")
        if env_name in environ:
            values[f.name] = _convert(f.name, environ[env_name], env_name)
        if args.get(f.name) is not None:
            values[f.name] = _convert(f.name, args[f.name], flags.get(f.name))
    return HostConfig(**values)


__all__ = ["ConfigError", "HostConfig", "VmParams", "is_loopback_endpoint", "load_config"]
