"""redis-server (Debian's, in a stock container without our agent) attached and squeezed while
redis-benchmark runs: p50/p99 GET latency with no balloon, under balloon pressure, and under
host swap (hostd's vSwap lowering the container's limit), from one run.

    python3 scenarios/redis_latency.py [--image balloonlab-redis:bookworm] [--requests 200000]

Needs root, swap, Docker and an image with redis-server and redis-benchmark (the offline
base image once scripts/build-base-image.sh installs redis-server and redis-tools; or any
Debian image with them). redis runs in a container of 256 MiB (+ 512 MiB swap) with ~160 MiB
of data; the benchmark runs in a container of its own that shares redis's network namespace
(so its own memory is not charged to redis).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from balloonlab import Lab, MiB


def docker(*args: str, timeout: float = 300) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True, timeout=timeout).stdout


def benchmark(image: str, container: str, requests: int, keys: int, *tests: str) -> dict[str, dict[str, float]]:
    out = docker("run", "--rm", "--network", f"container:{container}", image, "redis-benchmark", "-t",
                 ",".join(tests), "-n", str(requests), "-r", str(keys), "-d", "128", "-c", "8", "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    return {row["test"]: {k: float(v) for k, v in row.items() if k != "test"} for row in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="balloonlab-redis:bookworm")
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--squeeze-to", default="144MiB", help="memory left to redis under balloon pressure")
    parser.add_argument("--out", type=Path, default=Path("redis-latency"))
    args = parser.parse_args()
    name = f"balloonlab-redis-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    docker("run", "-d", "--name", name, "--label", "balloonlab.example=redis", "--memory", "256m",
           "--memory-swap", "768m", "--network", "none", args.image, "redis-server", "--save", "",
           "--appendonly", "no", "--protected-mode", "no")
    rows: list[tuple[str, dict[str, float], str]] = []
    try:
        time.sleep(1)
        print("filling redis ...", file=sys.stderr)
        benchmark(args.image, name, int(args.keys * 1.5), args.keys, "set")  # ~78 % of the keys: ~160 MiB
        container_id = docker("inspect", "-f", "{{.Id}}", name).strip()
        config = args.out / "hostd.toml"
        args.out.mkdir(parents=True, exist_ok=True)
        # The container's cgroup as a vm's: hostd's vSwap may lower its limit (host swap).
        config.write_text(f'[vms.redis]\ncgroup = "docker/{container_id}"\n')
        with Lab(host_memory="4GiB", workdir=args.out / "lab",
                 hostd_args=["--config", str(config), "--block-max", "0", "--vswap-step", "32MiB"]) as lab:
            timeline = lab.watch(0.5)
            redis = lab.attach(f"docker:{name}", vm_id="redis")
            facts = redis.facts()
            print(f"redis: {(facts.usage_bytes or 0) / MiB:.0f} MiB in use of {facts.memsz_bytes / MiB:.0f} MiB",
                  file=sys.stderr)

            lab.mark("no balloon")
            result = benchmark(args.image, name, args.requests, args.keys, "get")["GET"]
            rows.append(("no balloon", result, f"swap {redis.facts().swap_mib:.0f} MiB"))

            squeeze = redis.squeeze(to=args.squeeze_to, timeout=90)
            before = redis.facts()
            result = benchmark(args.image, name, args.requests, args.keys, "get")["GET"]
            after = redis.facts()
            rows.append((f"balloon pressure ({squeeze.balloon_bytes / MiB:.0f} MiB ballooned)", result,
                         f"swap {after.swap_mib:.0f} MiB, +{(after.major_faults or 0) - (before.major_faults or 0)} "
                         "major faults"))
            redis.release()

            # Host swap: the balloon may not help (maxmemctl 0), the host is short of memory:
            # hostd lowers the container's limit and the host kernel pages redis out.
            redis.set(maxmemctl_bytes=0)
            lab.host_memory(args.squeeze_to)
            redis.wait_until(lambda f: (redis.status() or {}).get("vswap_limit_bytes") is not None
                             and (f.usage_bytes or 0) <= (redis.status() or {})["vswap_limit_bytes"] + 8 * MiB,
                             90, "hostd's vSwap to lower redis's limit")
            before = redis.facts()
            limit = (redis.status() or {}).get("vswap_limit_bytes") or 0
            result = benchmark(args.image, name, args.requests, args.keys, "get")["GET"]
            after = redis.facts()
            rows.append((f"host swap (limit lowered to {limit / MiB:.0f} MiB)", result,
                         f"swap {after.swap_mib:.0f} MiB, +{(after.major_faults or 0) - (before.major_faults or 0)} "
                         "major faults"))
            lab.host_memory("4GiB")
            timeline.write_jsonl(args.out / "timeline.jsonl")
            timeline.plot(args.out / "timeline.png", "redis-server under ballooning and host swap")
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
    lines = [f"redis-benchmark GET, {args.requests} requests, 8 clients, 128-byte values, "
             f"{args.keys} key space; redis in 256 MiB",
             f"{'condition':<44} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7}  notes"]
    for label, result, notes in rows:
        lines.append(f"{label:<44} {result['rps']:>9,.0f} {result['p50_latency_ms']:>7.3f} "
                     f"{result['p99_latency_ms']:>7.3f}  {notes}")
    table = "\n".join(lines)
    (args.out / "redis-latency.txt").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
