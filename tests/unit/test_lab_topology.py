"""The lab file: parsing, refusals, the processes it implies, and agreement with the compose
lab (.env holds docker-compose.yml's defaults)."""

from pathlib import Path

import pytest

from lab.spec import (
    DEFAULT_HOSTD_CONFIG,
    DEFAULT_LAB_FILE,
    Endpoints,
    GuestSpec,
    LabSpecError,
    guest_argv,
    guest_environment,
    load_lab,
    parse_lab,
)
from protocol.units import parse_size_bytes

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def dotenv() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / ".env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def compose_size(text: str) -> int:
    """Compose sizes: 512m = 512 MiB."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    return int(text[:-1]) * units[text[-1].lower()]


def test_the_compose_lab_and_the_cgroup_lab_have_the_same_guests():
    spec = load_lab(DEFAULT_LAB_FILE)
    env = dotenv()
    compose = (ROOT / "docker-compose.yml").read_text()
    assert [g.name for g in spec.guests] == ["web", "batch", "db"]
    for guest in spec.guests:
        prefix = guest.name.upper()
        assert f"\n  {guest.name}:\n" in compose, f"{guest.name} missing from docker-compose.yml"
        assert compose_size(env[f"{prefix}_MEMORY"]) == guest.memory_bytes
        assert compose_size(env[f"{prefix}_MEMORY_AND_SWAP"]) == guest.memory_bytes + guest.swap_bytes
        assert env[f"{prefix}_PHASES"] == guest.phases


def test_the_compose_lab_overcommits_host_memory_about_one_and_a_half_times():
    spec = load_lab(DEFAULT_LAB_FILE)
    host_bytes = parse_size_bytes(dotenv()["BALLOONLAB_HOST_MEMORY"])
    assert DEFAULT_HOSTD_CONFIG.is_file()
    assert 1.3 <= sum(g.memory_bytes for g in spec.guests) / host_bytes <= 1.7


def test_a_guest_table_becomes_a_guest():
    spec = parse_lab('[guests.web]\nmemory = "256MiB"\nswap = "128MiB"\nphases = "active 100MiB"\n')
    assert spec.guests == (GuestSpec("web", 256 * MiB, 128 * MiB, "active 100MiB"),)


def test_a_third_party_workload_replaces_balloon_workload():
    spec = parse_lab('[guests.s]\nmemory = "256MiB"\ncommand = ["stress-ng", "--vm", "1", "--vm-bytes", "100M"]\n')
    guest = spec.guests[0]
    assert guest.swap_bytes == 0 and guest.phases == ""
    assert guest_argv("python3", guest) == ["python3", "-m", "guestagent.supervise", "--",
                                            "stress-ng", "--vm", "1", "--vm-bytes", "100M"]


@pytest.mark.parametrize(("text", "message"), [
    ("", "no guests"),
    ("guests = 3", "no guests"),
    ("[vms.web]\n", "unknown top-level keys"),
    ('[guests.Web]\nmemory = "256MiB"\nphases = "idle"\n', "lowercase"),
    ('[guests.web]\nmemory = "lots"\nphases = "idle"\n', "[guests.web]"),
    ('[guests.web]\nmemory = "16MiB"\nphases = "idle"\n', "at least 64 MiB"),
    ('[guests.web]\nmemory = "256MiB"\nphases = "sprint 3MiB"\n', "phases:"),
    ('[guests.web]\nmemory = "256MiB"\nphases = "idle"\ncolour = "red"\n', "unknown keys"),
    ('[guests.web]\nmemory = "256MiB"\nphases = "idle"\ncommand = ["x"]\n', "not both"),
    ('[guests.web]\nmemory = "256MiB"\ncommand = "stress-ng"\n', "list of strings"),
    ("[guests.web\n", "not valid TOML"),
])
def test_bad_lab_files_are_refused_with_the_key_named(text, message):
    with pytest.raises(LabSpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_lab(text)


def test_guests_get_their_own_endpoint_cgroup_and_report_file_and_none_of_hostds_settings():
    guest = GuestSpec("db", 512 * MiB, 512 * MiB, "active 280MiB")
    environment = guest_environment(
        {"PATH": "/bin", "BALLOONLAB_IDLE_TAX": "0", "BALLOONLAB_LOG_LEVEL": "DEBUG"}, guest,
        Endpoints("tcp://127.0.0.1:7000", "tcp://127.0.0.1:7001"), Path("/sys/fs/cgroup/memory/lab/db"),
        Path("/run/lab/db.workload.json"))
    assert environment == {
        "PATH": "/bin", "BALLOONLAB_LOG_LEVEL": "DEBUG", "BALLOONLAB_HOST_ENDPOINT": "tcp://127.0.0.1:7000",
        "BALLOONLAB_VM_ID": "db", "BALLOONLAB_CGROUP_PATH": "/sys/fs/cgroup/memory/lab/db",
        "BALLOONLAB_WORKLOAD_REPORT": "/run/lab/db.workload.json"}
