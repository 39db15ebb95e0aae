"""balloonctl top's view as pure functions over snapshots."""

import csv
import io

from hostd.top import COLUMNS, header_line, render_csv, render_table, render_text, top_rows

MiB = 1 << 20


def vm(vm_id, balloon_mib, swap_in=None, touches=None, alive=True):
    return {"vm_id": vm_id, "alive": alive, "memsz_bytes": 512 * MiB, "granted_bytes": 300 * MiB,
            "alloc_target_bytes": 350 * MiB, "active_bytes": 200 * MiB, "active_ratio": 0.39,
            "active_slow_ratio": 0.3, "active_fast_ratio": 0.39, "balloon_bytes": balloon_mib * MiB,
            "balloon_target_bytes": 162 * MiB, "balloon_max_bytes": 332 * MiB, "swap_current_bytes": None,
            "swap_target_bytes": 0, "swap_in_pages": swap_in, "swap_out_pages": None, "shares": 5120,
            "agent_state": "idle", "workload": {} if touches is None else {"touches_per_s": touches}}


def snapshot(uptime_ms, vms):
    return {"host": {"uptime_ms": uptime_ms, "host_memory_bytes": 1024 * MiB, "free_bytes": 80 * MiB,
                     "state": "soft", "idle_tax_ratio": 0.75, "sample_period_ms": 10_000, "balance_period_ms": 5_000,
                     "vms_alive": 2, "thresholds_bytes": {"high": 61 * MiB, "soft": 41 * MiB, "hard": 20 * MiB,
                                                          "low": 10 * MiB}},
            "vms": vms}


BEFORE = snapshot(1_000, [vm("web", 100, swap_in=1000), vm("batch", 200, swap_in=0)])
AFTER = snapshot(3_000, [vm("web", 120, swap_in=1512, touches=2.5e6), vm("batch", 240, swap_in=0, alive=False)])


def test_header_has_memory_free_state_tax_and_periods():
    line = header_line(AFTER, "MiB")
    for part in ("MEM 1024MiB", "FREE 80MiB", "STATE SOFT", "IDLE TAX 0.75", "SAMPLE 10s", "BALANCE 5s", "VMS 2/2"):
        assert part in line


def test_rows_sort_and_swap_rates_from_the_previous_snapshot():
    by_name = top_rows(AFTER, BEFORE, "MiB", "n")
    assert [row[0] for row in by_name] == ["batch", "web"]
    by_balloon = top_rows(AFTER, BEFORE, "MiB", "b")
    assert [row[0] for row in by_balloon] == ["batch", "web"]  # largest balloon first
    web = dict(zip(COLUMNS, by_balloon[1], strict=True))
    assert web["MCTLSZ"] == "120MiB" and web["MCTL?"] == "Y" and web["TOUCH/s"] == "2,500,000"
    assert web["SWR/s"] == "1MiB"  # 512 pages in 2 s = 1 MiB/s
    assert web["SWW/s"] == "-"  # unknown (cgroup v1)
    assert dict(zip(COLUMNS, by_balloon[0], strict=True))["MCTL?"] == "N"
    assert top_rows(AFTER, None)[1][COLUMNS.index("SWR/s")] == "-"  # no previous snapshot: no rate


def test_text_and_csv_renderings():
    text = render_text(AFTER, top_rows(AFTER, BEFORE), "MiB")
    lines = text.splitlines()
    assert lines[1].split() == list(COLUMNS)
    assert lines[2].startswith("batch") and lines[3].startswith("web")
    rows = top_rows(AFTER, BEFORE, "MiB", "n", numeric=True)
    table = list(csv.reader(io.StringIO(render_csv(AFTER, rows, True, "MiB"))))
    assert table[0][:4] == ["TIME", "HOST_STATE", "HOST_FREE(MiB)", "VM"] and "MCTLSZ(MiB)" in table[0]
    web = dict(zip(table[0], table[2], strict=True))
    assert web["MCTLSZ(MiB)"] == "120.0" and web["TOUCH/s"] == "2500000" and web["SWW/s(MiB)"] == ""
    assert len(list(csv.reader(io.StringIO(render_csv(AFTER, rows, False, "MiB"))))) == 2  # no header again


def test_live_table_renders_every_vm():
    from rich.console import Console

    console = Console(width=220, record=True, color_system=None)
    console.print(render_table(AFTER, top_rows(AFTER, BEFORE), "MiB", "b"))
    out = console.export_text()
    assert "MCTLSZ ▼" in out and "batch" in out and "web" in out and "STATE SOFT" in out


def test_a_guest_without_an_agent_shows_host_swap_from_its_swap_in_use():
    plain = {**vm("plain", 0), "has_agent": False, "frozen": True, "vswap_limit_bytes": 300 * MiB}
    before = snapshot(1_000, [{**plain, "swap_current_bytes": 100 * MiB}])
    after = snapshot(3_000, [{**plain, "swap_current_bytes": 140 * MiB}])
    row = dict(zip(COLUMNS, top_rows(after, before)[0], strict=True))
    assert row["MCTL?"] == "N" and row["STATE"] == "frozen" and row["HOSTLIM"] == "300MiB"
    assert row["SWW/s"] == "20MiB" and row["SWR/s"] == "0MiB"  # +40 MiB of swap in 2 s
