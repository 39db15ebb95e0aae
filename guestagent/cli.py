"""balloon-agent: the guest's balloon driver (entry point)."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from guestagent.config import ConfigError, load_config
from guestagent.errors import AgentError, CgroupError


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
    except ConfigError as exc:
        print(f"balloon-agent: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from guestagent.client import AgentLoop  # zmq is loaded only when the agent really runs

    try:
        loop = AgentLoop(cfg)
    except (AgentError, CgroupError) as exc:
        print(f"balloon-agent: {exc}", file=sys.stderr)
        return 1
    logging.getLogger("guestagent").info("effective configuration: %s", cfg)

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger("guestagent").info("%s: deflating and leaving", signal.Signals(signum).name)
        loop.stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return loop.run()


if __name__ == "__main__":
    raise SystemExit(main())
