"""The `balloonctl status` table: one line of host figures, one row per vm. Below ctl (the
CLI) so that lab's `lab status` renders it without importing the CLI that mounts lab."""

from __future__ import annotations

from hostd.status_doc import StatusDocument
from protocol.units import format_bytes

__all__ = ["render_status"]


def render_status(snapshot: StatusDocument, unit: str = "MiB") -> str:
    host = snapshot["host"]
    memory = format_bytes(host["host_memory_bytes"], unit)
    free = format_bytes(host["free_bytes"], unit)
    min_free = format_bytes(host["thresholds_bytes"]["high"], unit)
    lines = [
        f"host {host['session_id']}  state {host['state'].upper()}  memory {memory}  free {free}  (minFree {min_free})"
        f"  τ={host['idle_tax_ratio']:g}  sample {host['sample_period_ms'] / 1000:g}s"
        f"  balance {host['balance_period_ms'] / 1000:g}s  vms {host['vms_alive']}",
    ]
    header = ("VM", "ALIVE", "MEMSZ", "GRANT", "SZTGT", "%ACTV", "MCTLSZ", "MCTLTGT", "MCTLMAX", "SWCUR", "SWTGT",
              "SHARES", "STATE")
    rows = [header]
    for vm in snapshot["vms"]:
        rows.append((
            vm["vm_id"], "Y" if vm["alive"] else "N", format_bytes(vm["memsz_bytes"], unit),
            format_bytes(vm["granted_bytes"], unit), format_bytes(vm["alloc_target_bytes"], unit),
            f"{100 * vm['active_ratio']:.0f}", format_bytes(vm["balloon_bytes"], unit),
            format_bytes(vm["balloon_target_bytes"], unit), format_bytes(vm["balloon_max_bytes"], unit),
            format_bytes(vm["swap_current_bytes"], unit), format_bytes(vm["swap_target_bytes"], unit),
            str(vm["shares"]), vm["agent_state"],
        ))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(str(cell).rjust(width) if i else str(cell).ljust(width)
                               for i, (cell, width) in enumerate(zip(row, widths, strict=True))))
    return "\n".join(lines)
