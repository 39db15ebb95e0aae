"""`balloonctl top`: esxtop's memory panel for the lab.

The view is a pure function of two consecutive snapshots (rates need the previous one):
`header_line` and `top_rows` give text cells; `render_text`/`render_csv` print them for
batch mode (`-b -n N`), `render_table` makes a rich Table for the live view. Keys in the live
view: m MEMSZ, b MCTLSZ, s SWCUR, a %ACTV, t throughput, n name (sort); u MiB/GiB; q quit."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from hostd.status_doc import StatusDocument
from protocol.limits import PAGE_SIZE_BYTES
from protocol.units import format_bytes

COLUMNS = ("VM", "MEMSZ", "GRANT", "SZTGT", "TCHD", "%ACTV", "%ACTVS", "%ACTVF", "MCTL?", "MCTLSZ", "MCTLTGT",
           "MCTLMAX", "SWCUR", "SWTGT", "SWR/s", "SWW/s", "HOSTLIM", "SHARES", "TOUCH/s", "STATE")
SORT_KEYS: dict[str, tuple[str, Callable[[dict[str, Any]], Any]]] = {
    # key: (column, value to sort by, largest first except the name)
    "n": ("VM", lambda vm: vm["vm_id"]),
    "m": ("MEMSZ", lambda vm: vm["memsz_bytes"]),
    "b": ("MCTLSZ", lambda vm: vm["balloon_bytes"]),
    "s": ("SWCUR", lambda vm: vm["swap_current_bytes"] or 0),
    "a": ("%ACTV", lambda vm: vm["active_ratio"]),
    "t": ("TOUCH/s", lambda vm: vm["workload"].get("touches_per_s") or 0),
}


def header_line(snapshot: StatusDocument, unit: str) -> str:
    host = snapshot["host"]
    thresholds = host["thresholds_bytes"]
    return (f"MEM {format_bytes(host['host_memory_bytes'], unit)}  FREE {format_bytes(host['free_bytes'], unit)}  "
            f"STATE {host['state'].upper()} (high {format_bytes(thresholds['high'], unit)} soft "
            f"{format_bytes(thresholds['soft'], unit)} hard {format_bytes(thresholds['hard'], unit)} low "
            f"{format_bytes(thresholds['low'], unit)})  IDLE TAX {host['idle_tax_ratio']:g}  "
            f"SAMPLE {host['sample_period_ms'] / 1000:g}s  BALANCE {host['balance_period_ms'] / 1000:g}s  "
            f"VMS {host['vms_alive']}/{len(snapshot['vms'])}")


SIZE_COLUMNS = {"MEMSZ", "GRANT", "SZTGT", "TCHD", "MCTLSZ", "MCTLTGT", "MCTLMAX", "SWCUR", "SWTGT", "SWR/s",
                "SWW/s", "HOSTLIM"}
_SHIFT = {"MiB": 20, "GiB": 30}


def top_rows(snapshot: StatusDocument, previous: StatusDocument | None, unit: str = "MiB",
             sort_key: str = "n", numeric: bool = False) -> list[tuple[str, ...]]:
    """One row of text cells per vm, sorted; swap rates from the previous snapshot.
    `numeric`: plain numbers for scripts (sizes in `unit`, "" when unknown) instead of
    "512MiB", "1,234" and "-"."""
    _column, value = SORT_KEYS[sort_key]
    vms = sorted((cast(dict[str, Any], vm) for vm in snapshot["vms"]), key=value, reverse=sort_key != "n")
    before = {vm["vm_id"]: cast(dict[str, Any], vm) for vm in (previous["vms"] if previous else [])}
    elapsed_s = ((snapshot["host"]["uptime_ms"] - previous["host"]["uptime_ms"]) / 1000) if previous else 0.0

    def size(value: float | None) -> str:
        if numeric:
            return "" if value is None else f"{value / (1 << _SHIFT[unit]):.1f}"
        return format_bytes(None if value is None else int(value), unit)

    def rate(vm: dict[str, Any], key: str) -> str:
        then = before.get(vm["vm_id"], {}).get(key)
        now = vm.get(key)
        if then is None and now is None and not vm.get("has_agent", True):
            # No agent to count swap-ins and -outs: the net change of SWCUR stands in (SWW/s
            # when it grows, SWR/s when it shrinks; a lower bound of the real traffic).
            then, now = before.get(vm["vm_id"], {}).get("swap_current_bytes"), vm.get("swap_current_bytes")
            if then is None or now is None or elapsed_s <= 0:
                return "" if numeric else "-"
            delta = (now - then) if key == "swap_out_pages" else (then - now)
            return size(max(0, delta) / elapsed_s)
        if then is None or now is None or elapsed_s <= 0 or now < then:
            return "" if numeric else "-"
        return size((now - then) * PAGE_SIZE_BYTES / elapsed_s)

    def count(value: float | None) -> str:
        if value is None:
            return "" if numeric else "-"
        return f"{value:.0f}" if numeric else f"{value:,.0f}"

    rows: list[tuple[str, ...]] = []
    for vm in vms:
        touches = vm["workload"].get("touches_per_s")
        rows.append((
            vm["vm_id"], size(vm["memsz_bytes"]), size(vm["granted_bytes"]), size(vm["alloc_target_bytes"]),
            size(vm["active_bytes"]), f"{100 * vm['active_ratio']:.0f}", f"{100 * vm['active_slow_ratio']:.0f}",
            f"{100 * vm['active_fast_ratio']:.0f}", "Y" if vm["alive"] and vm.get("has_agent", True) else "N",
            size(vm["balloon_bytes"]),
            size(vm["balloon_target_bytes"]), size(vm["balloon_max_bytes"]), size(vm["swap_current_bytes"]),
            size(vm["swap_target_bytes"]), rate(vm, "swap_in_pages"), rate(vm, "swap_out_pages"),
            size(vm.get("vswap_limit_bytes")), str(vm["shares"]), count(touches),
            "frozen" if vm.get("frozen") else vm["agent_state"],
        ))
    return rows


def render_text(snapshot: StatusDocument, rows: Sequence[tuple[str, ...]], unit: str) -> str:
    table = [COLUMNS, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = [header_line(snapshot, unit)]
    for row in table:
        lines.append("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip())
    return "\n".join(lines)


def render_csv(snapshot: StatusDocument, rows: Sequence[tuple[str, ...]], with_header: bool, unit: str) -> str:
    """esxtop's batch CSV: a timestamp, the host's state and free memory, then the vm columns
    (rows from `top_rows(..., numeric=True)`; size columns carry their unit in the header)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if with_header:
        writer.writerow(("TIME", "HOST_STATE", f"HOST_FREE({unit})",
                         *(f"{c}({unit})" if c in SIZE_COLUMNS else c for c in COLUMNS)))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    free = f"{snapshot['host']['free_bytes'] / (1 << _SHIFT[unit]):.1f}"
    for row in rows:
        writer.writerow((stamp, snapshot["host"]["state"], free, *row))
    return out.getvalue().rstrip("\n")


def render_table(snapshot: StatusDocument, rows: Sequence[tuple[str, ...]], unit: str, sort_key: str) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    state_style = {"high": "green", "soft": "yellow", "hard": "dark_orange", "low": "bold red"}
    header = Text(header_line(snapshot, unit), style=state_style.get(snapshot["host"]["state"], ""))
    sort_column = SORT_KEYS[sort_key][0]
    table = Table(box=None, header_style="bold reverse", pad_edge=False, expand=False)
    for column in COLUMNS:
        table.add_column(column + (" ▼" if column == sort_column else ""), justify="left" if column == "VM"
                         else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row, style="dim" if row[8] == "N" else None)
    keys = Text("sort: n name  m MEMSZ  b MCTLSZ  s SWCUR  a %ACTV  t TOUCH/s   u MiB/GiB   q quit", style="dim")
    return Group(header, Text(""), table, Text(""), keys)


# ---- the loop (I/O: hostd, the terminal, the clock) -----------------------------------------
def run_top(fetch: Callable[[], StatusDocument], delay_s: float, iterations: int, batch: bool, as_csv: bool,
            unit: str, sort_key: str, write: Callable[[str], None]) -> None:
    """Batch mode prints `iterations` snapshots (0 = until interrupted); the live view runs
    until q or Ctrl-C. `fetch` raises to stop (hostd gone in batch mode)."""
    import sys

    if batch or not sys.stdin.isatty() or not sys.stdout.isatty():
        previous = None
        count = 0
        while True:
            snapshot = fetch()
            rows = top_rows(snapshot, previous, unit, sort_key, numeric=as_csv)
            write(render_csv(snapshot, rows, count == 0, unit) if as_csv else render_text(snapshot, rows, unit) + "\n")
            previous, count = snapshot, count + 1
            if iterations and count >= iterations:
                return
            time.sleep(delay_s)
    _live(fetch, delay_s, iterations, unit, sort_key)


def _live(fetch: Callable[[], StatusDocument], delay_s: float, iterations: int, unit: str, sort_key: str) -> None:
    import select
    import sys
    import termios
    import tty

    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin)
    console = Console()
    previous: StatusDocument | None = None
    snapshot: StatusDocument | None = None
    count = 0
    try:
        tty.setcbreak(stdin)
        with Live(Text("waiting for hostd..."), console=console, screen=True, auto_refresh=False) as live:
            next_fetch = 0.0
            while True:
                now = time.monotonic()
                if now >= next_fetch:
                    next_fetch = now + delay_s
                    try:
                        previous, snapshot = snapshot, fetch()
                        count += 1
                    except Exception as exc:  # hostd restarting: say so and keep trying
                        live.update(Text(f"no answer from hostd: {exc}", style="bold red"), refresh=True)
                        snapshot = None
                if snapshot is not None:
                    live.update(render_table(snapshot, top_rows(snapshot, previous, unit, sort_key), unit, sort_key),
                                refresh=True)
                if iterations and count >= iterations:
                    return
                ready, _, _ = select.select([stdin], [], [], max(0.0, next_fetch - time.monotonic()))
                if ready:
                    key = sys.stdin.read(1).lower()
                    if key == "q":
                        return
                    if key == "u":
                        unit = "GiB" if unit == "MiB" else "MiB"
                    elif key in SORT_KEYS:
                        sort_key = key
    except KeyboardInterrupt:
        return
    finally:
        termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
