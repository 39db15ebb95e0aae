"""Run every benchmark: python -m bench [NAME ...]. Results print as tables; the figures
we got are written down in bench/RESULTS.md."""

import importlib
import sys

BENCHES = ["protocol_bench", "ledger_bench", "policy_bench", "hostd_bench", "agent_bench"]


def main() -> int:
    names = sys.argv[1:] or BENCHES
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        module.main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
