"""The public client of a running balloon-hostd: what balloonctl, the lab, the experiments and
tests use to read status and change settings (no private names across packages).

    client = HostdClient("tcp://127.0.0.1:5556")          # credentials found as balloonctl finds them
    snapshot = client.status()                             # the `balloonctl status --json` document
    client.set_host(idle_tax_ratio=0.5, host_memory_bytes=1 << 30)
    client.set_vm("web", shares="high", reservation_bytes=128 << 20)
    client.target("web", 51200)                            # pin MCTLTGT (pages); None = the policy's
Every call is one request/reply; a hostd that does not answer in time or refuses raises CtlError.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from hostd.status_doc import StatusDocument
from protocol import (
    ControlOk,
    Error,
    ErrorCode,
    GetStatus,
    Message,
    ProtocolError,
    SetHostParams,
    SetManualTarget,
    SetVmParams,
    StatusReply,
    decode,
    encode,
)
from protocol.limits import MAX_CONTROL_FRAME_BYTES

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5556"
DEFAULT_TOKEN_FILE = Path("/run/balloonlab/control.token")


@dataclass(frozen=True, slots=True)
class ControlCredentials:
    """How balloonctl shows hostd it may change things: the control token (read from the file
    hostd made), or a CURVE operator key with hostd's public key. Found by default: flags, else
    BALLOONLAB_CONTROL_TOKEN_FILE / BALLOONLAB_CONTROL_KEY / BALLOONLAB_CONTROL_SERVER_KEY, else
    the default token file."""

    token_file: Path | None = None
    key_file: Path | None = None  # the operator's .key_secret
    server_key_file: Path | None = None  # hostd's public .key

    @classmethod
    def from_environment(cls, token_file: str | None = None, key_file: str | None = None,
                         server_key_file: str | None = None) -> ControlCredentials:
        def pick(flag: str | None, env: str) -> Path | None:
            value = flag or os.environ.get(env)
            return Path(value) if value else None

        return cls(pick(token_file, "BALLOONLAB_CONTROL_TOKEN_FILE") or DEFAULT_TOKEN_FILE,
                   pick(key_file, "BALLOONLAB_CONTROL_KEY"), pick(server_key_file, "BALLOONLAB_CONTROL_SERVER_KEY"))

    def token(self) -> str | None:
        """The token if its file is readable here (hostd refuses changes without one)."""
        from hostd.auth import ControlTokenError, read_control_token

        if self.token_file is None:
            return None
        try:
            return read_control_token(self.token_file)
        except ControlTokenError:
            return None

    def authorize(self, message: Message) -> Message:
        if isinstance(message, SetVmParams | SetHostParams | SetManualTarget) and message.control_token is None:
            token = self.token()
            if token is not None:
                return dataclasses.replace(message, control_token=token)
        return message


class CtlError(Exception):
    """Printed as `balloonctl: ...` with exit code 1 (2 for usage errors)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def request(endpoint: str, message: Message, timeout_ms: int = 3000,
            credentials: ControlCredentials | None = None) -> Message:
    """One request/reply over a DEALER. Raises CtlError if hostd does not answer in time.
    Changes carry the credentials (by default: found as balloonctl finds them)."""
    import zmq

    credentials = credentials or ControlCredentials.from_environment()
    message = credentials.authorize(message)
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_FRAME_BYTES)
        if credentials.key_file is not None:
            from protocol.keys import KeyFileError, load_keypair

            if credentials.server_key_file is None:
                raise CtlError("--key needs --server-key (hostd's public key) too")
            try:
                own, server = load_keypair(credentials.key_file), load_keypair(credentials.server_key_file)
            except KeyFileError as exc:
                raise CtlError(str(exc)) from None
            if own.secret_key is None:
                raise CtlError(f"{credentials.key_file} holds no secret key (give the .key_secret file)")
            sock.curve_publickey, sock.curve_secretkey = own.public_key, own.secret_key
            sock.curve_serverkey = server.public_key
        # Bounded like the answer: after hostd refuses a CURVE handshake libzmq drops the pipe,
        # and a blocking send would then wait for a connection that never comes.
        sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
        sock.connect(endpoint)
        hint = ("is balloon-hostd running? --endpoint or BALLOONLAB_CONTROL_ENDPOINT"
                + ("; is this key in hostd's operator allowlist?" if credentials.key_file is not None else ""))
        try:
            sock.send(encode(message, 1))
        except zmq.Again:
            raise CtlError(f"no answer from hostd at {endpoint} within {timeout_ms} ms: no connection "
                           f"took the request ({hint})") from None
        if not sock.poll(timeout_ms):
            raise CtlError(f"no answer from hostd at {endpoint} within {timeout_ms} ms ({hint})")
        try:
            return decode(sock.recv(), MAX_CONTROL_FRAME_BYTES).message
        except ProtocolError as exc:
            raise CtlError(f"hostd sent an invalid reply: {exc}") from None
    finally:
        sock.close(linger=0)


def checked_reply(reply: Message) -> Message:
    if isinstance(reply, Error):
        name = ErrorCode.label(reply.code)
        raise CtlError(f"refused ({name}): {reply.detail}")
    return reply




class HostdClient:
    """One hostd's control endpoint, with the credentials for changes."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout_ms: int = 3000,
                 credentials: ControlCredentials | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self.credentials = credentials or ControlCredentials.from_environment()

    def _call(self, message: Message, timeout_ms: int | None = None) -> Message:
        return checked_reply(request(self.endpoint, message, timeout_ms or self.timeout_ms, self.credentials))

    def status(self, timeout_ms: int | None = None) -> StatusDocument:
        reply = self._call(GetStatus(), timeout_ms)
        assert isinstance(reply, StatusReply)
        return cast(StatusDocument, reply.snapshot)  # the document hostd built (hostd/status_doc.py)

    def _change(self, message: Message) -> dict[str, Any]:
        reply = self._call(message)
        assert isinstance(reply, ControlOk)
        return reply.data

    def set_host(self, **params: int | float | str | bool | None) -> dict[str, Any]:
        """idle_tax_ratio, sample_period_ms, balance_period_ms, host_memory_bytes, ctl_max_percent."""
        return self._change(SetHostParams(params=params))

    def set_vm(self, vm_id: str, **params: int | float | str | bool | None) -> dict[str, Any]:
        """shares, reservation_bytes, limit_bytes, maxmemctl_bytes (None: back to the default)."""
        return self._change(SetVmParams(vm_id=vm_id, params=params))

    def target(self, vm_id: str, balloon_target_pages: int | None) -> dict[str, Any]:
        """Pin the vm's balloon target (pages), or None for the policy's."""
        return self._change(SetManualTarget(vm_id=vm_id, balloon_target_pages=balloon_target_pages))
