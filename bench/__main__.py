"""Run benchmarks: python -m bench [NAME ...] [--json].

Without --json each bench prints its tables. With --json the figures print as one JSON object
(for one NAME: that bench's named figures with the date and the machine; for several: one
such object per name), so scripts can compare runs. The figures we got are written down in
bench/RESULTS.md."""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time
from typing import Any

BENCHES = ["protocol_bench", "ledger_bench", "policy_bench", "hostd_bench", "agent_bench", "relief_bench"]


def machine() -> dict[str, Any]:
    import psutil
    import zmq

    return {"hostname": platform.node(), "kernel": platform.release(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
            "pyzmq": zmq.pyzmq_version(), "libzmq": zmq.zmq_version(),
            "load_average_1m_at_start": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    names = [a for a in args if a != "--json"] or BENCHES
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown bench {unknown}; choose from {BENCHES}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        if not as_json:
            module.main()
            continue
        started = time.time()
        header = {"bench": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                  "machine": machine()}
        figures = module.run()
        results[name] = {**header, "seconds": round(time.time() - started, 1), **figures}
    if as_json:
        print(json.dumps(results[names[0]] if len(names) == 1 else results, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
