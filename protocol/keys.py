"""CurveZMQ key files: generate a key pair, load it, keep an allowlist of agent public keys.

The one module of `protocol` that touches files (and zmq, lazily, for key generation): the
sockets that use these keys live in hostd and guestagent. Files use ZeroMQ's own
certificate format (zmq.auth), so `NAME.key` (public) and `NAME.key_secret` (both halves)
interoperate with other ZeroMQ tooling. The allowlist is a directory of `*.key` files:
hostd accepts an agent whose public key matches one of them, and lets that key register only
the vm ids its file names (metadata `vm_ids = "web,db"`; without it, the vm named like the key).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class KeyFileError(Exception):
    """A key file is missing, unreadable or malformed."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    public_key: bytes  # Z85, 40 bytes
    secret_key: bytes | None  # Z85, 40 bytes; None for a public-only certificate


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise KeyFileError(f"key name {name!r}: use 1..64 letters, digits, '_', '.', '-'")


def generate_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write DIRECTORY/NAME.key and DIRECTORY/NAME.key_secret (mode 0600). Refuses to overwrite."""
    import zmq.auth  # lazy: `import protocol` must not load zmq

    _check_name(name)
    directory.mkdir(parents=True, exist_ok=True)
    public_path = directory / f"{name}.key"
    secret_path = directory / f"{name}.key_secret"
    for path in (public_path, secret_path):
        if path.exists():
            raise KeyFileError(f"{path} already exists; remove it first to make a new key")
    old_umask = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(old_umask)
    return Path(public), Path(secret)


def load_keypair(path: Path) -> KeyPair:
    """Load a `.key` or `.key_secret` file."""
    import zmq.auth

    if not path.is_file():
        raise KeyFileError(f"key file {path} not found")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"key file {path} is not a ZeroMQ certificate: {exc}") from exc
    if public is None or len(public) != 40:
        raise KeyFileError(f"key file {path} has no valid public key")
    return KeyPair(public_key=public, secret_key=secret)


@dataclass(frozen=True, slots=True)
class AllowEntry:
    """One allowlisted key: its name (the ZAP User-Id hostd sees) and the vm ids it may register."""

    name: str
    public_key: bytes
    vm_ids: frozenset[str]


def allowlist_add(allowlist_dir: Path, public_key_file: Path, name: str, vm_ids: tuple[str, ...] = ()) -> Path:
    """Copy a public key into the allowlist as NAME.key (public part only), bound to `vm_ids`
    (default: the vm called NAME). An operator allowlist ignores the binding."""
    _check_name(name)
    for vm_id in vm_ids:
        _check_name(vm_id)
    pair = load_keypair(public_key_file)
    allowlist_dir.mkdir(parents=True, exist_ok=True)
    target = allowlist_dir / f"{name}.key"
    bound = ",".join(vm_ids or (name,))
    temporary = allowlist_dir / f".{name}.key.tmp"
    temporary.write_text(
        "#   ZeroMQ CURVE Public Certificate (balloonlab allowlist)\n"
        f"metadata\n    name = \"{name}\"\n    vm_ids = \"{bound}\"\n"
        f"curve\n    public-key = \"{pair.public_key.decode()}\"\n"
    )
    temporary.replace(target)  # hostd reloads the directory while it runs: never a half-written file
    return target


def allowlist_remove(allowlist_dir: Path, name: str) -> None:
    _check_name(name)
    target = allowlist_dir / f"{name}.key"
    if not target.exists():
        raise KeyFileError(f"{name} is not in the allowlist {allowlist_dir}")
    target.unlink()


def allowlist_public_keys(allowlist_dir: Path) -> dict[str, bytes]:
    """name → Z85 public key for every `*.key` file in the allowlist directory."""
    return {name: entry.public_key for name, entry in allowlist_entries(allowlist_dir).items()}


_VM_IDS_LINE = re.compile(r'^\s+vm_ids\s*=\s*"([^"]*)"\s*$', re.MULTILINE)


def allowlist_entries(allowlist_dir: Path) -> dict[str, AllowEntry]:
    """name → entry for every `*.key` file in the allowlist directory."""
    if not allowlist_dir.is_dir():
        raise KeyFileError(f"allowlist directory {allowlist_dir} not found")
    entries = {}
    for path in sorted(allowlist_dir.glob("*.key")):
        public_key = load_keypair(path).public_key
        try:
            match = _VM_IDS_LINE.search(path.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"key file {path}: {exc}") from None
        vm_ids = frozenset(v.strip() for v in match.group(1).split(",") if v.strip()) if match else frozenset()
        entries[path.stem] = AllowEntry(path.stem, public_key, vm_ids or frozenset({path.stem}))
    return entries
