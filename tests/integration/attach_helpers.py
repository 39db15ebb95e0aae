"""What the attach tests on v1 (tests/integration/test_attach.py) and on v2
(tests/v2/test_attach_v2.py) share: the stock guest they balloon, starting `balloonctl attach`,
and reading the target's cgroup and the agents' logs."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from tests.integration.hostd_proc import HostdProcess

# An idle service holding memory it touched once: what a stock container without our agent looks like.
HOLDER = ("import signal, time\nsignal.signal(signal.SIGTERM, lambda *_: exit(0))\nb = bytearray({size} << 20)\n"
          "for i in range(0, len(b), 4096): b[i] = 1\nprint('ready', flush=True)\nwhile True: time.sleep(1)\n")


def start_attach(hostd: HostdProcess, tmp_path: Path, target: str, *extra: str,
                 report_interval: str = "500ms") -> subprocess.Popen[str]:
    """`balloonctl attach TARGET` against this hostd, its log in tmp_path/attach-*.log."""
    with open(tmp_path / f"attach-{uuid.uuid4().hex[:6]}.log", "w") as log:
        return subprocess.Popen([sys.executable, "-m", "balloonctl", "--endpoint", hostd.control_endpoint,
                                 "--token-file", str(hostd.token_file), "attach", target, "--host-endpoint",
                                 hostd.agent_endpoint, "--state-dir", str(tmp_path / "attach"), "--report-interval",
                                 report_interval, *extra], stderr=log, text=True)


def memory_stat(cgroup: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in (cgroup / "memory.stat").read_text().splitlines())}


def attach_logs(tmp_path: Path) -> str:
    return "\n".join(path.read_text()[-2500:] for path in sorted(tmp_path.glob("attach-*.log")))


def left_with_bye(snapshot: dict, vm_id: str) -> bool:
    return any(d["vm_id"] == vm_id and d["reason"].startswith("bye") for d in snapshot.get("departed", []))
