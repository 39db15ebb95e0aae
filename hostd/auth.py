"""Who may talk to hostd: CURVE keys (agents bound to vm ids, operators) and the control token.

    gate = CurveGate(context, agent_dir, operator_dir)   # before any socket binds
    gate.reload_if_changed()   -> True when the allowlists changed (main loop, once a second)
    gate.agent_vm_ids()        -> {key name: vm ids it may register}, for HostCore
    ensure_control_token(path) -> the token balloonctl must present for a change, or None

The ZAP handler runs in its own thread and reads the current
key ring, which the main loop swaps as a whole when a file in an allowlist changes: a
removed key cannot open a connection from then on, and HostCore refuses the frames of
connections it had already opened (the ZAP User-Id travels with every frame).
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from zmq.utils import z85

from protocol.keys import AllowEntry, KeyFileError, allowlist_entries
from protocol.messages import check_secret

log = logging.getLogger(__name__)

AGENT_DOMAIN = "agents"
CONTROL_DOMAIN = "control"


@dataclass(frozen=True, slots=True)
class KeyRing:
    """Z85 public key → allowlist entry, for agents and operators."""

    agents: dict[bytes, AllowEntry] = field(default_factory=dict)
    operators: dict[bytes, AllowEntry] = field(default_factory=dict)


def load_keyring(agent_dir: Path | None, operator_dir: Path | None) -> KeyRing:
    def by_key(directory: Path | None) -> dict[bytes, AllowEntry]:
        if directory is None:
            return {}
        return {entry.public_key: entry for entry in allowlist_entries(directory).values()}

    return KeyRing(agents=by_key(agent_dir), operators=by_key(operator_dir))


def _directory_stamp(directory: Path | None) -> tuple[Any, ...]:
    if directory is None:
        return ()
    try:
        return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in directory.glob("*.key")))
    except OSError:
        return ("unreadable",)


class _ZapHandler(threading.Thread):
    """ZeroMQ's ZAP (RFC 27) for CURVE, in its own thread: one REP socket on the well-known
    inproc endpoint. Hand-written rather than pyzmq's ThreadAuthenticator, whose interface
    differs between the pyzmq on PyPI and Debian's python3-zmq."""

    ENDPOINT = "inproc://zeromq.zap.01"

    def __init__(self, context: zmq.Context[Any], gate: CurveGate) -> None:
        super().__init__(name="zap", daemon=True)
        self._context = context
        self._gate = gate
        self._stopping = threading.Event()
        self._bound = threading.Event()
        self._error: Exception | None = None

    def start(self) -> None:
        super().start()
        self._bound.wait(10)
        if self._error is not None or not self._bound.is_set():
            raise RuntimeError(f"the ZAP handler did not start: {self._error}")

    def run(self) -> None:
        sock: zmq.Socket[bytes] = self._context.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.ENDPOINT)
        except zmq.ZMQError as exc:
            self._error = exc
            sock.close()
            return
        self._bound.set()
        try:
            while not self._stopping.is_set():
                if not sock.poll(100):
                    continue
                request = sock.recv_multipart()
                sock.send_multipart(self._answer(request))
        finally:
            sock.close(linger=0)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6:
            return [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, domain, _address, _identity, mechanism = request[:6]
        credentials = request[6:]
        if version != b"1.0":
            return [b"1.0", request_id, b"500", b"ZAP version not supported", b"", b""]
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return [b"1.0", request_id, b"400", b"CURVE only", b"", b""]
        entry = self._gate.lookup(domain.decode("ascii", "replace"), z85.encode(credentials[0]))
        if entry is None:
            return [b"1.0", request_id, b"400", b"key not allowed", b"", b""]
        return [b"1.0", request_id, b"200", b"OK", entry.name.encode(), b""]

    def stop(self) -> None:
        self._stopping.set()
        self.join(2)


class CurveGate:
    """The ZAP handler over the current key ring. Start it before binding any CURVE socket
    (and set `zap_enforce_domain` on them), so that no handshake is ever accepted without it."""

    def __init__(self, context: zmq.Context[Any], agent_dir: Path, operator_dir: Path | None) -> None:
        self._agent_dir = agent_dir
        self._operator_dir = operator_dir
        self.ring = load_keyring(agent_dir, operator_dir)
        self._stamp = (_directory_stamp(agent_dir), _directory_stamp(operator_dir))
        self._zap = _ZapHandler(context, self)
        self._zap.start()
        log.info("CurveZMQ on: %d agent keys from %s, %d operator keys from %s", len(self.ring.agents), agent_dir,
                 len(self.ring.operators), operator_dir or "(none: control changes need the token)")

    def lookup(self, domain: str, z85_client_key: bytes) -> AllowEntry | None:
        """ZAP thread: the entry that lets this key open a connection in this domain, or None.
        Its name becomes the connection's User-Id, on every frame."""
        ring = self.ring  # one reference read: the main loop swaps whole rings
        if domain == AGENT_DOMAIN:
            return ring.agents.get(z85_client_key)
        if domain == CONTROL_DOMAIN:
            return ring.operators.get(z85_client_key)
        return None

    def reload_if_changed(self) -> bool:
        stamp = (_directory_stamp(self._agent_dir), _directory_stamp(self._operator_dir))
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            ring = load_keyring(self._agent_dir, self._operator_dir)
        except KeyFileError as exc:
            log.error("allowlist not reloaded, the previous keys stay in force: %s", exc)
            return False
        self.ring = ring
        log.info("allowlists reloaded: %d agent keys, %d operator keys", len(ring.agents), len(ring.operators))
        return True

    def agent_vm_ids(self) -> dict[str, frozenset[str]]:
        return {entry.name: entry.vm_ids for entry in self.ring.agents.values()}

    def stop(self) -> None:
        self._zap.stop()


ZMQ_ZAP_ENFORCE_DOMAIN = getattr(zmq, "ZAP_ENFORCE_DOMAIN", 93)  # libzmq ≥ 4.3; older pyzmq lacks the name


def enforce_zap(sock: zmq.Socket[bytes], domain: str) -> None:
    """Make a missing or silent ZAP handler mean refusal (libzmq otherwise accepts every key)."""
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    sock.setsockopt(ZMQ_ZAP_ENFORCE_DOMAIN, 1)


class ControlTokenError(Exception):
    """The token file exists but cannot be trusted or read."""


def ensure_control_token(path: Path) -> str:
    """The token in `path`, made (0600, in a 0700 directory when it creates one) if missing.
    Refuses a file that is a symlink, not ours, or readable by others."""
    directory = path.parent
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return read_control_token(path, must_be_private=True)
    token = secrets.token_urlsafe(32)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return token


def read_control_token(path: Path, must_be_private: bool = False) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ControlTokenError(f"control token {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if must_be_private and (not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid()
                                or info.st_mode & 0o077):
            raise ControlTokenError(f"control token {path} must be a regular file of uid {os.geteuid()} with mode "
                                    f"0600 (it is {oct(info.st_mode & 0o777)}, uid {info.st_uid})")
        token = os.read(fd, 4096).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    try:
        check_secret("control token", token)
    except Exception:
        raise ControlTokenError(f"control token {path} does not hold a token") from None
    return token
