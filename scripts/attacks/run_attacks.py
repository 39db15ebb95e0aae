"""Run the attack tests (issues 13 and 14) and print their figures as JSON and as a table.

    .venv/bin/python scripts/attacks/run_attacks.py [-k EXPR] [--json out.json]

It runs tests/integration/test_identity_attacks.py and test_input_attacks.py under pytest with
ATTACK_FIGURES set, so every FIGURES line the tests report is collected, then prints one row per
attack: hostd alive, honest lock p99 and status p99 during the attack (ms), status timeouts, RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="pytest -k expression")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as out:
        figures_path = out.name
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "tests/integration/test_identity_attacks.py", "tests/integration/test_input_attacks.py"]
    if args.k:
        command += ["-k", args.k]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "ATTACK_FIGURES": figures_path})
    records = [json.loads(line) for line in Path(figures_path).read_text().splitlines() if line.strip()]
    os.unlink(figures_path)
    print(json.dumps(records, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    header = ("attack", "alive", "lock p99 ms", "status p99 ms", "status timeouts", "RSS start→after MiB")
    rows = [header]
    for record in records:
        during = record.get("during")
        if during is None:
            continue
        rows.append((record["attack"], str(record["hostd_alive"]), str(during.get("lock_p99_ms")),
                     str(during.get("status_p99_ms")), f"{during.get('status_timeouts')}/{during.get('status_polls')}",
                     f"{record.get('rss_start_mib')}→{record.get('rss_after_mib')}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
