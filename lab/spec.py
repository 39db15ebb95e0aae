"""The lab file (lab.toml) and everything derived from it, as pure functions: which guests,
their memory, swap and workload, and the exact command line and environment of each process.
docker-compose.yml describes the same topology (tests/unit/test_lab_topology.py)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from guestagent.phases import PhaseSpecError, parse_phases
from protocol.units import parse_size_bytes

DEFAULT_LAB_FILE = Path(__file__).with_name("lab.toml")
DEFAULT_HOSTD_CONFIG = Path(__file__).with_name("hostd.toml")
_GUEST_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")  # a cgroup directory and a vm id
MIN_GUEST_MEMORY_BYTES = 64 << 20


class LabSpecError(ValueError):
    """A lab file that cannot describe a lab; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class GuestSpec:
    name: str
    memory_bytes: int  # the cgroup's memory limit: the guest's memsz
    swap_bytes: int  # the guest's own swap on top of it
    phases: str  # balloon-workload's phase spec; "" when `command` replaces the workload
    command: tuple[str, ...] = ()  # a third-party workload instead (e.g. stress-ng --vm ...)
    workload_user: str = ""  # NAME, UID or UID:GID the workload runs as; "" = a uid of its own (lab/runner.py)


@dataclass(frozen=True, slots=True)
class LabSpec:
    guests: tuple[GuestSpec, ...]


def parse_lab(text: str, source: str = "lab.toml") -> LabSpec:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LabSpecError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(document) - {"guests"}
    if unknown:
        raise LabSpecError(f"{source}: unknown top-level keys {sorted(unknown)} (expected [guests.NAME] tables)")
    tables = document.get("guests")
    if not isinstance(tables, dict) or not tables:
        raise LabSpecError(f"{source}: no guests (add a [guests.NAME] table with memory, swap and phases)")
    return LabSpec(tuple(_guest(name, table, source) for name, table in tables.items()))


def _guest(name: str, table: object, source: str) -> GuestSpec:
    where = f"{source}: [guests.{name}]"
    if not _GUEST_NAME.match(name):
        raise LabSpecError(f"{where}: a guest name is 1-31 lowercase letters, digits or '-', starting with a letter")
    if not isinstance(table, dict):
        raise LabSpecError(f"{where}: must be a table")
    unknown = set(table) - {"memory", "swap", "phases", "command", "workload_user"}
    if unknown:
        raise LabSpecError(f"{where}: unknown keys {sorted(unknown)} (memory, swap, phases, command, workload_user)")
    workload_user = table.get("workload_user", "")
    if not isinstance(workload_user, str | int) or isinstance(workload_user, bool):
        raise LabSpecError(f"{where}: workload_user is a user name, a uid or \"UID:GID\"")
    workload_user = str(workload_user).strip()
    if workload_user:
        from guestagent.runas import RunAsError, parse_user

        try:
            parse_user(workload_user)
        except RunAsError as exc:
            raise LabSpecError(f"{where}: workload_user: {exc}") from None
    try:
        memory_bytes = parse_size_bytes(str(table.get("memory", "")))
        swap_bytes = parse_size_bytes(str(table.get("swap", "0")))
    except ValueError as exc:
        raise LabSpecError(f"{where}: {exc}") from None
    if memory_bytes < MIN_GUEST_MEMORY_BYTES:
        raise LabSpecError(f"{where}: memory must be at least {MIN_GUEST_MEMORY_BYTES >> 20} MiB")
    command = table.get("command", [])
    if not isinstance(command, list) or not all(isinstance(word, str) and word for word in command):
        raise LabSpecError(f"{where}: command must be a list of strings, e.g. [\"stress-ng\", \"--vm\", \"1\"]")
    phases = str(table.get("phases", ""))
    if command and phases:
        raise LabSpecError(f"{where}: give phases (balloon-workload) or command (your own workload), not both")
    if not command:
        try:
            parse_phases(phases)
        except PhaseSpecError as exc:
            raise LabSpecError(f"{where}: phases: {exc}") from None
    return GuestSpec(name, memory_bytes, swap_bytes, phases, tuple(command), workload_user)


def load_lab(path: Path) -> LabSpec:
    try:
        text = path.read_text()
    except OSError as exc:
        raise LabSpecError(f"cannot read the lab file {path}: {exc.strerror}") from None
    return parse_lab(text, str(path))


# ---- processes ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Endpoints:
    agent: str  # hostd's ROUTER for the agents
    control: str  # balloonctl's


@dataclass(frozen=True, slots=True)
class LabKeys:
    """Where `lab up` keeps the lab's CurveZMQ keys (lab/compose_keys.py's layout): hostd's
    pair and allowlist in hostd/, each guest's pair and hostd's public key in GUEST/."""

    root: Path

    @property
    def hostd_dir(self) -> Path:
        return self.root / "hostd"

    @property
    def host_secret(self) -> Path:
        return self.hostd_dir / "host.key_secret"

    @property
    def allowlist(self) -> Path:
        return self.hostd_dir / "allow"

    def guest_dir(self, name: str) -> Path:
        return self.root / name

    def guest_secret(self, name: str) -> Path:
        return self.guest_dir(name) / f"{name}.key_secret"

    def guest_host_public(self, name: str) -> Path:
        return self.guest_dir(name) / "host.key"


@dataclass(frozen=True, slots=True)
class WorkloadUser:
    uid: int
    gid: int
    workdir: Path  # the workload's own directory (owned by uid, 0700): its cwd and its report


def hostd_argv(python: str, config_path: Path, endpoints: Endpoints, event_log: Path,
               keys: LabKeys | None = None) -> list[str]:
    # balloonctl's changes are kept for this lab's hostd only (a new lab starts from its config);
    # the control token stays at its default path (0600 root), where balloonctl looks for it.
    argv = [python, "-m", "hostd", "--config", str(config_path), "--agent-endpoint", endpoints.agent,
            "--control-endpoint", endpoints.control, "--event-log", str(event_log),
            "--settings-file", str(event_log.parent / "hostd-settings.json")]
    if keys is not None:  # agents only with an allowlisted key, each bound to its own vm id
        argv += ["--curve-secret-key", str(keys.host_secret), "--curve-allowlist", str(keys.allowlist)]
    return argv


def guest_argv(python: str, guest: GuestSpec) -> list[str]:
    argv = [python, "-m", "guestagent.supervise"]
    if guest.command:
        return [*argv, "--", *guest.command]
    return [*argv, "--phases", guest.phases]


def guest_environment(base: dict[str, str], guest: GuestSpec, endpoints: Endpoints, cgroup_path: Path,
                      workload_report: Path, keys: LabKeys | None = None,
                      workload_user: WorkloadUser | None = None) -> dict[str, str]:
    """The agent is told its cgroup explicitly (it runs inside it, but a lab on a v1 host has
    several hierarchies) and the workload reports to a file of its own guest. Key files go by
    path (never a key in the environment or on a command line), and balloon-guest passes
    none of this to the workload, which runs as `workload_user`."""
    environment = {k: v for k, v in base.items() if not k.startswith("BALLOONLAB_")}
    environment.update({
        "BALLOONLAB_HOST_ENDPOINT": endpoints.agent,
        "BALLOONLAB_VM_ID": guest.name,
        "BALLOONLAB_CGROUP_PATH": str(cgroup_path),
        "BALLOONLAB_WORKLOAD_REPORT": str(workload_report),
    })
    if keys is not None:
        environment["BALLOONLAB_CURVE_CLIENT_KEY"] = str(keys.guest_secret(guest.name))
        environment["BALLOONLAB_CURVE_SERVER_PUBLIC_KEY"] = str(keys.guest_host_public(guest.name))
    if workload_user is not None:
        environment["BALLOONLAB_WORKLOAD_USER"] = f"{workload_user.uid}:{workload_user.gid}"
        environment["BALLOONLAB_WORKLOAD_DIR"] = str(workload_user.workdir)
    for name in ("BALLOONLAB_LOG_LEVEL", "BALLOONLAB_REPORT_INTERVAL", "BALLOONLAB_WS_PERIOD"):
        if name in base:
            environment[name] = base[name]
    return environment
