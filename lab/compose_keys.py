"""The compose lab's one-shot key service: CurveZMQ keys made at the first `up`, kept in volumes.

    python3 -m lab.compose_keys --hostd DIR --guest web=DIR --guest batch=DIR ...

hostd's DIR gets its key pair (host.key, host.key_secret) and an allowlist (allow/) in which
each guest's public key is bound to that guest's vm id alone. Each guest's DIR (its own
volume, mounted only into that guest) gets its key pair and hostd's public key: a guest can
prove who it is and check that it talks to this lab's hostd, and nothing else (redis's key
goes to the `attach` service, the agent that balloons redis from outside its image). Run again, it
keeps every key that exists (restarts and `up` after `down` without `-v` keep the lab's keys)
and adds what is missing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from protocol.keys import KeyFileError, allowlist_add, allowlist_entries, generate_keypair, load_keypair

HOST_KEY = "host"


def ensure_keypair(directory: Path, name: str) -> Path:
    """DIRECTORY/NAME.key_secret, made if missing; returns the public key file."""
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if not secret.exists():
        for stale in (public, secret):
            stale.unlink(missing_ok=True)
        generate_keypair(directory, name)
    load_keypair(secret)  # a damaged file fails here, not at hostd's start
    return public


def provision(hostd_dir: Path, guests: dict[str, Path]) -> list[str]:
    done = []
    hostd_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    host_public = ensure_keypair(hostd_dir, HOST_KEY)
    allow = hostd_dir / "allow"
    allow.mkdir(mode=0o700, exist_ok=True)
    known = allowlist_entries(allow)
    for vm_id, directory in guests.items():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        guest_public = ensure_keypair(directory, vm_id)
        shutil.copyfile(host_public, directory / f"{HOST_KEY}.key")
        entry = known.get(vm_id)
        if entry is None or entry.public_key != load_keypair(guest_public).public_key or entry.vm_ids != {vm_id}:
            allowlist_add(allow, guest_public, vm_id, (vm_id,))
            done.append(f"{vm_id}: key allowed for vm {vm_id}")
        else:
            done.append(f"{vm_id}: key kept")
    return done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m lab.compose_keys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hostd", type=Path, required=True, help="hostd's key volume")
    parser.add_argument("--guest", action="append", default=[], metavar="VM=DIR", help="a guest's key volume")
    args = parser.parse_args(argv)
    guests = {}
    for item in args.guest:
        vm_id, sep, directory = item.partition("=")
        if not sep or not vm_id or not directory:
            parser.error(f"--guest {item!r}: VM=DIR")
        guests[vm_id] = Path(directory)
    try:
        for line in provision(args.hostd, guests):
            print(f"compose-keys: {line}")
    except KeyFileError as exc:
        print(f"compose-keys: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
