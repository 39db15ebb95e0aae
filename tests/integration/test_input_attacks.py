"""Issue 14's attacks (the audit's table, review-security.md) re-run against a real hostd on loopback.

Every test runs an honest agent in its own process (tests/integration/simagent.py: a lock and an
unlock round trip every 100 ms, a status every 250 ms) and polls `get_status` (what `balloonctl
status` sends) every 100 ms, and prints a FIGURES line: hostd alive, the honest lock p50/p99 and
status p50/p99 before, during and after the attack, RSS. Assertions are liveness bounds only:
hostd alive, every status answered within balloonctl's 3 s timeout, no honest lock unanswered
within 5 s, the honest vm never lost. Attackers run in their own processes and stop by themselves.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import zmq

from protocol import Error, Welcome
from tests.integration.attacklab import (
    ATTACK_HOSTD_FLAGS,
    REPO,
    HonestAgentProcess,
    complete,
    errors_total,
    measure,
    report,
    rss_mib,
    run_attacker,
    run_attackers,
)
from tests.integration.hostd_proc import HostdProcess, vm
from tests.integration.simagent import SimAgent

pytestmark = pytest.mark.integration

MiB = 1 << 20
GiB = 1 << 30

# Reported to the merger with a patch (see scripts/attacks/README.md): a pass of the agent socket
# is bounded by frame count (512) only, never by time, so frames that each cost tens or hundreds
# of ms (range-heavy decodes, O(n) ledger inserts, O(vms) PFN checks) starve the control socket
# and the tick for seconds.
STARVATION = ("hostd/server.py:_on_agent_readable bounds a pass by AGENT_FRAMES_PER_PASS=512 frames, not by time: "
              "expensive frames starve balloonctl status past its 3 s timeout")


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def run_measured(tmp_path: Path, name: str, attack, flags: tuple[str, ...] = ATTACK_HOSTD_FLAGS,
                 honest_extra: tuple[str, ...] = ()) -> tuple[dict[str, Any], HostdProcess]:
    """hostd + the honest agent; the attack measured; figures reported. hostd is stopped."""
    hostd = HostdProcess(tmp_path, *flags)
    try:
        with HonestAgentProcess(hostd.agent_endpoint, "honest", tmp_path, 170, *honest_extra) as honest:
            figures = measure(hostd, honest, name, lambda: attack(hostd))
        figures = complete(figures, honest.result or {})
        report(figures)
        return figures, hostd
    finally:
        hostd.stop()


def assert_survived(figures: dict[str, Any]) -> None:
    assert figures["hostd_alive"], figures
    assert figures["honest_registered"] and figures["honest_resets"] == 0, figures
    assert figures["honest_registrations"] == 1 and figures["honest_not_registered"] == 0, figures
    for window in ("during", "after"):
        assert figures[window]["lock_timeouts"] == 0, (window, figures[window])
        assert figures[window]["status_timeouts"] == 0, (window, figures[window])
        assert not figures[window]["honest_errors"], (window, figures[window])
    assert figures["during"]["status_polls"] >= 1


# ---- S1: one absurd stat ------------------------------------------------------------------------
def test_s1_absurd_stats_never_stop_hostd(tmp_path):
    extremes = [2**64 - 1, 2**63, 2**63 - 1, 2**53 + 1, -1, -(2**63), 1e308, -1e308, 5e-324, 2**50 + 1]
    answers: dict[str, str] = {}
    refused_on_the_wire: list[str] = []

    def attack(hostd: HostdProcess) -> dict[str, Any]:
        with SimAgent(hostd.agent_endpoint, "absurd", 256 * MiB) as agent:
            assert isinstance(agent.hello(), Welcome)
            for value in extremes:
                for key in ("usage_bytes", "swap_used_bytes", "swap_in_pages", "major_faults", "ws_samples",
                            "ws_current_ratio", "workload_ops"):
                    if agent.status_refused(stats={key: value}):  # typed fields (protocol v4): range-checked
                        refused_on_the_wire.append(f"{key}={value!r}")
                    agent.status(stats={key: value})  # sent either way (raw msgpack if refused)
                    reply = hostd.status(3000)  # the frame that stopped hostd was the next get_status
                    answers[f"{key}={value!r}"] = "ok" if reply else "none"
            for bad in (float("nan"), float("inf")):  # the codec refuses these outright
                agent.status(stats={"usage_bytes": bad})
            late = agent.pump(500)
            snapshot = hostd.status()
            record = vm(snapshot, "absurd")
            with urllib.request.urlopen(f"{hostd.http_url}/status.json", timeout=5) as response:
                strict_json(response.read().decode())
        return {"stat_values_tried": len(answers), "statuses_answered": sum(v == "ok" for v in answers.values()),
                "nonfinite_answers": [m.code for m in late if isinstance(m, Error)],
                "absurd_consumed_bytes": record["consumed_bytes"], "free_bytes": snapshot["host"]["free_bytes"],
                "absurd_alive": record["alive"]}

    figures, _ = run_measured(tmp_path, "S1 absurd stats", attack)
    assert_survived(figures)
    assert figures["statuses_answered"] == figures["stat_values_tried"]
    # NaN and Infinity refused by the codec (INVALID_FIELD), and every out-of-range value of a typed
    # field (usage_bytes, ws_samples, ws_current_ratio); absurd informational stats are unknown, not errors.
    assert refused_on_the_wire and all(not k.startswith(("swap", "major", "workload")) for k in refused_on_the_wire)
    assert figures["errors_counted"] == 2 + len(refused_on_the_wire)
    assert 0 <= figures["absurd_consumed_bytes"] <= 256 * MiB and abs(figures["free_bytes"]) <= GiB


# ---- S7: a fake petabyte vm ------------------------------------------------------------------------
def _targets_beside(tmp_path: Path, claim_bytes: int, usage_bytes: int) -> dict[str, Any]:
    """An honest `web` (512 MiB, 20 % active) beside a refusing, fully active vm claiming
    `claim_bytes` and using `usage_bytes`: web's targets once they are stable."""
    tmp_path.mkdir()
    hostd = HostdProcess(tmp_path, *ATTACK_HOSTD_FLAGS)
    try:
        with SimAgent(hostd.agent_endpoint, "web", 512 * MiB) as web, \
                SimAgent(hostd.agent_endpoint, "giant", claim_bytes) as giant:
            assert isinstance(web.hello(), Welcome) and isinstance(giant.hello(), Welcome)
            history: list[tuple] = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                web.status(stats={"usage_bytes": 400 * MiB}, touched=0.2)
                giant.status(stats={"usage_bytes": usage_bytes, "swap_used_bytes": usage_bytes}, touched=1.0,
                             state="refusing")
                web.pump(0)
                giant.pump(0)
                snapshot = hostd.status()
                record = vm(snapshot, "web")
                history.append((record["alloc_target_bytes"], record["balloon_target_bytes"],
                                record["swap_target_bytes"], snapshot["host"]["state"]))
                if len(history) >= 12 and len(set(history[-6:])) == 1:
                    break
                time.sleep(0.25)
            alloc, balloon, swap, state = history[-1]
            return {"web_alloc_target_mib": alloc / MiB, "web_balloon_target_mib": balloon / MiB,
                    "web_swap_target_mib": swap / MiB, "state": state,
                    "giant_memsz_mib": vm(snapshot, "giant")["memsz_bytes"] / MiB,
                    "stable": len(set(history[-6:])) == 1}
    finally:
        hostd.stop()


def test_s7_a_fake_petabyte_vm_moves_honest_targets_no_more_than_an_honest_host_size_vm(tmp_path):
    honest_giant = _targets_beside(tmp_path / "honest", GiB, GiB)
    fake = _targets_beside(tmp_path / "fake", 1 << 50, 1 << 50)
    report({"attack": "S7 fake petabyte vm", "beside_honest_1GiB_vm": honest_giant, "beside_fake_1PiB_vm": fake})
    assert honest_giant["stable"] and fake["stable"]
    assert fake["giant_memsz_mib"] == 1024  # capped at host memory
    for key in ("web_alloc_target_mib", "web_balloon_target_mib", "web_swap_target_mib", "state"):
        assert fake[key] == honest_giant[key], key


# ---- S9: lock frames of many one-page ranges -------------------------------------------------------
def test_s9_lock_frames_of_many_one_page_ranges(tmp_path):
    def attack(hostd: HostdProcess) -> dict[str, Any]:
        return run_attacker("range-bomb", "--endpoint", hostd.agent_endpoint, "--mode", "wide", "--frames", "200",
                            "--window", "128", "--max-seconds", "40", timeout_s=90)

    figures, _ = run_measured(tmp_path, "S9 wide one-page-range locks", attack)
    assert_survived(figures)


def test_s9_front_inserts_into_a_full_ledger(tmp_path):
    def attack(hostd: HostdProcess) -> dict[str, Any]:
        return run_attacker("range-bomb", "--endpoint", hostd.agent_endpoint, "--mode", "front", "--frames", "700",
                            "--window", "64", "--max-seconds", "45", timeout_s=90)

    figures, _ = run_measured(tmp_path, "S9 front inserts, ledger full", attack)
    assert_survived(figures)


# ---- S10: PFN ranges ---------------------------------------------------------------------------------
def test_s10_pfn_locks_beside_many_pfn_vms(tmp_path):
    def attack(hostd: HostdProcess) -> dict[str, Any]:
        return run_attacker("pfn-squat", "--endpoint", hostd.agent_endpoint, "--vms", "1000", "--frames", "120",
                            "--window", "64", "--max-seconds", "50", timeout_s=90)

    figures, _ = run_measured(tmp_path, "S10 PFN locks beside 1000 PFN vms", attack)
    assert_survived(figures)


# ---- S11: 20,000 one-shot identities ----------------------------------------------------------------
# History (2026-12-01): the review's +196 MiB (every record kept) became +58..+63 MiB once dead and
# never-reported vms were forgotten, joins rate-limited and statuses cached per vm (session 8; the
# in-process model: a hello costs 45 µs refused, ~150 µs welcomed). What stayed was not Python's
# (tracemalloc +2.6 MiB) but libzmq's per-connection pipes and buffers (~48 KiB a connection), freed
# but kept by glibc's arenas: +53..+105 MiB in 3 runs at load 4-6 (session 10), with every vm gone.
# hostd now trims its heap after churn (hostd/heap_trim.py): +4.4 MiB a few seconds after the flood,
# each trim 7-42 ms of the loop. An accept backlog of 4096 (tried in session 8) held every connection
# at once (+225..+278 MiB, the honest vm lost): not kept.
# The four attacker processes run at nice 10: on this 2-core machine they otherwise take most of the
# CPU hostd's loop needs (at nice 0 ~half the hellos went unanswered within 1 s and status p99 was
# 0.44-1.17 s; at nice 10 1-7 % and 0.32-0.35 s). A real lab's guests are bounded by their cgroups.
S11_RSS_GOAL_MIB = 32  # issue 14's acceptance: RSS after 20,000 one-shot identities < start + 32 MiB
S11_SETTLE_S = 20  # trims come ≤ 2 s apart during a flood and 5 s after its last churn (losses come 3 s after)


@pytest.mark.timeout(200)
def test_s11_twenty_thousand_one_shot_identities(tmp_path):
    def attack(hostd: HostdProcess) -> dict[str, Any]:
        start_mib = rss_mib(hostd.process)
        senders = run_attackers([["identities", "--endpoint", hostd.agent_endpoint, "--count", "5000", "--prefix",
                                  f"p{i}", "--max-seconds", "70", "--answer-timeout", "1"] for i in range(4)],
                                timeout_s=110, niceness=10)
        ended = time.monotonic()
        end_mib = settled_mib = rss_mib(hostd.process)
        while settled_mib >= start_mib + S11_RSS_GOAL_MIB and time.monotonic() - ended < S11_SETTLE_S:
            time.sleep(0.5)
            settled_mib = rss_mib(hostd.process)
        answers: dict[str, int] = {}
        for sender in senders:
            for code, count in sender["answers"].items():
                answers[code] = answers.get(code, 0) + count
        return {"identities": sum(s["count"] for s in senders), "answers": answers,
                "answer_p99_ms": max((s["answer_p99_ms"] or 0) for s in senders),
                "rss_attack_start_mib": start_mib, "rss_attack_end_mib": end_mib, "rss_settled_mib": settled_mib,
                "rss_settled_after_s": round(time.monotonic() - ended, 1)}

    figures, _ = run_measured(tmp_path, "S11 20,000 one-shot identities", attack)
    assert_survived(figures)
    assert figures["identities"] == 20_000
    assert figures["rss_settled_mib"] - figures["rss_attack_start_mib"] < S11_RSS_GOAL_MIB, figures
    assert figures["during"]["status_p99_ms"] < 1000, figures["during"]
    assert figures["rss_after_mib"] is not None


# ---- S12: 1 MiB varint bombs -------------------------------------------------------------------------
def test_s12_one_mebibyte_varint_bombs(tmp_path):
    def attack(hostd: HostdProcess) -> dict[str, Any]:
        return run_attacker("varint-bomb", "--endpoint", hostd.agent_endpoint, "--frames", "40",
                            "--max-seconds", "60", timeout_s=90)

    figures, _ = run_measured(tmp_path, "S12 1 MiB varint bombs", attack)
    assert_survived(figures)


# ---- S13: control starvation under a flood of valid frames ------------------------------------------
def test_s13_control_plane_under_a_flood_of_valid_statuses(tmp_path):
    def attack(hostd: HostdProcess) -> dict[str, Any]:
        return run_attacker("status-flood", "--endpoint", hostd.agent_endpoint, "--vms", "4", "--seconds", "8",
                            timeout_s=60)

    figures, _ = run_measured(tmp_path, "S13 valid status flood", attack)
    assert_survived(figures)


# ---- S15: host_memory=4KiB, strict JSON ---------------------------------------------------------------
def test_s15_tiny_host_memory_is_refused_and_every_json_output_stays_json(tmp_path):
    timeline = tmp_path / "timeline.jsonl"
    hostd = HostdProcess(tmp_path, *ATTACK_HOSTD_FLAGS, "--timeline", str(timeline))
    try:
        with SimAgent(hostd.agent_endpoint, "web", 512 * MiB) as web, SimAgent(hostd.agent_endpoint, "db") as db:
            assert isinstance(web.hello(), Welcome) and isinstance(db.hello(), Welcome)
            refused = hostd.ctl("host", "host_memory=4KiB")
            smallest = hostd.ctl("host", "host_memory=16MiB")  # the smallest accepted: ρ may be infinite here
            stream = urllib.request.urlopen(f"{hostd.http_url}/events", timeout=10)
            updates = []
            try:
                deadline = time.monotonic() + 6
                while len(updates) < 3 and time.monotonic() < deadline:
                    web.status(stats={"usage_bytes": 500 * MiB}, touched=1.0)
                    db.status(stats={"usage_bytes": 200 * MiB}, touched=1.0)
                    line = stream.readline().decode()
                    if line.startswith("data:"):
                        updates.append(strict_json(line.removeprefix("data:")))
            finally:
                stream.close()
            with urllib.request.urlopen(f"{hostd.http_url}/status.json", timeout=5) as response:
                document = strict_json(response.read().decode())
            status_json = subprocess.run([sys.executable, "-m", "balloonctl", "--endpoint", hostd.control_endpoint,
                                          "status", "--json"], capture_output=True, text=True, timeout=30, cwd=REPO)
    finally:
        hostd.stop()
    events = [strict_json(line) for line in hostd.event_log.read_text().splitlines()]
    samples = [strict_json(line) for line in timeline.read_text().splitlines()]
    rhos = [v["rho"] for v in document["vms"]]
    report({"attack": "S15 host_memory=4KiB and strict JSON", "4KiB_rc": refused.returncode,
            "4KiB_message": refused.stderr.strip()[-200:], "16MiB_rc": smallest.returncode, "sse_updates": len(updates),
            "status_json_rc": status_json.returncode, "events": len(events), "timeline_records": len(samples),
            "rho": rhos})
    assert refused.returncode == 1 and "INVALID_FIELD" in refused.stderr
    assert smallest.returncode == 0, smallest.stderr
    assert len(updates) >= 1 and status_json.returncode == 0, status_json.stderr
    strict_json(status_json.stdout)
    assert all(rho is None or math.isfinite(rho) for rho in rhos)


# ---- S22: multipart frames counted once -------------------------------------------------------------
def test_s22_multipart_frames_are_counted_once(tmp_path):
    hostd = HostdProcess(tmp_path, *ATTACK_HOSTD_FLAGS)
    context = zmq.Context()
    try:
        before = hostd.status()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(hostd.agent_endpoint)
        frames = 500
        for index in range(frames):
            sock.send_multipart([b"part"] * (2 + index % 4))
        answered = 0
        while answered < frames and sock.poll(3000):
            sock.recv()
            answered += 1
        after = hostd.status()
    finally:
        context.destroy(linger=0)
        hostd.stop()
    counted = errors_total(after) - errors_total(before)
    malformed = after["host"]["protocol_errors"].get("MALFORMED", 0) - before["host"]["protocol_errors"].get(
        "MALFORMED", 0)
    report({"attack": "S22 multipart counted once", "frames": frames, "answered": answered, "errors_counted": counted,
            "malformed_counted": malformed})
    assert answered == frames and counted == frames and malformed == frames


# ---- Phase 2 (a): 100,000 malformed frames -----------------------------------------------------------
def test_a_hundred_thousand_malformed_frames(tmp_path):
    def attack(hostd: HostdProcess) -> dict[str, Any]:
        endpoint = hostd.agent_endpoint
        peak = {"rss": rss_mib(hostd.process)}
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.5):
                if hostd.process.poll() is None:
                    peak["rss"] = max(peak["rss"], rss_mib(hostd.process))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            senders = run_attackers([["flood", "--endpoint", endpoint, "--frames", "50000", "--seed", str(seed),
                                      "--large", "52", "--max-seconds", "30"] for seed in (1, 2)]
                                    + [["oversize", "--endpoint", endpoint, "--frames", "60"]], timeout_s=90)
        finally:
            stop.set()
            watcher.join()
        sent = sum(s["frames"] for s in senders[:2])
        # What hostd still had queued: drained once the count has not moved for 3 s (one
        # unchanged pair of polls 0.5 s apart was not enough on a loaded host: hostd may spend
        # that long on one pass, and the count then stopped at 49.7 % of the frames).
        counted, stable_since = None, time.monotonic()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and time.monotonic() - stable_since < 3.0:
            now_counted = errors_total(hostd.status(5000))
            if now_counted != counted:
                counted, stable_since = now_counted, time.monotonic()
            time.sleep(0.5)
        return {"frames": sent, "oversize_frames": senders[2]["frames"],
                "send_s": max(s["send_s"] for s in senders[:2]),
                "mix": {k: senders[0]["mix"].get(k, 0) + senders[1]["mix"].get(k, 0) for k in senders[0]["mix"]},
                "rss_peak_mib": peak["rss"], "errors_total_when_drained": counted}

    figures, _ = run_measured(tmp_path, "100,000 malformed frames", attack)
    assert_survived(figures)
    assert figures["frames"] == 100_000
    # Refused and counted: the whole flood reached hostd. A few mutations of valid frames stay
    # valid (a hello that is welcomed, a bye, a heartbeat); 99,989 of 100,000 were counted on
    # 2026-12-01. Before the attackers held their connections open until hostd had answered
    # (attackers._read_replies_until_quiet), 20-60 % were counted: libzmq drops what a ROUTER
    # received from a peer but had not read yet when that peer disconnects.
    assert figures["errors_counted"] >= 0.95 * figures["frames"], figures["errors_counted"]
    assert figures["errors_total_when_drained"] is not None

