"""hostd/server.py's loop under a backlog of agent frames: a control request that arrives
while agent frames are queued is answered within the agent pass (between batches of frames),
not only once the pass is over."""

from __future__ import annotations

import time

import pytest
import zmq

from hostd import server as server_module
from hostd.config import load_config
from hostd.server import HostServer
from protocol import GetStatus, StatusReply
from protocol.codec import decode, encode
from tests.conftest import free_loopback_port


@pytest.fixture
def server(tmp_path):
    agent, control = free_loopback_port(), free_loopback_port()
    config = load_config(["--agent-endpoint", f"tcp://127.0.0.1:{agent}",
                          "--control-endpoint", f"tcp://127.0.0.1:{control}",
                          "--event-log", str(tmp_path / "events.jsonl"),
                          "--control-token-file", str(tmp_path / "token"),
                          "--settings-file", str(tmp_path / "settings.json"), "--http", "off"])
    hostd = HostServer(config)
    try:
        yield hostd
    finally:
        hostd.close()
        hostd.context.destroy(linger=0)


def _dealer(context: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def test_a_control_request_is_answered_between_batches_of_agent_frames(server, monkeypatch):
    monkeypatch.setattr(server_module, "PASS_BUDGET_S", 60.0)  # the pass ends by frame count only
    context = zmq.Context()
    agent = _dealer(context, server.config.agent_endpoint)
    control = _dealer(context, server.config.control_endpoint)
    try:
        for _ in range(server_module.AGENT_FRAMES_PER_PASS * 2):
            agent.send(b"\xc1 not msgpack")
        control.send(encode(GetStatus(), 1))
        deadline = time.monotonic() + 10

        def ready(sock: zmq.Socket) -> bool:
            return bool(sock.get(zmq.EVENTS) & zmq.POLLIN)

        while not (ready(server.agent_socket) and ready(server.control_socket)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready(server.control_socket)
        seen_at: list[int] = []
        handle = server.core.handle_agent

        def counting(*args, **kwargs):
            seen_at.append(len(seen_at))
            return handle(*args, **kwargs)

        monkeypatch.setattr(server.core, "handle_agent", counting)
        assert server._on_agent_readable() is True  # frames are left: the pass was cut at 512
        assert len(seen_at) == server_module.AGENT_FRAMES_PER_PASS
        assert control.poll(2000), "the control request was left for after the agent pass"
        assert isinstance(decode(control.recv()).message, StatusReply)
    finally:
        agent.close()
        control.close()
        context.term()
