"""balloon-hostd: the host daemon (the VMkernel memory scheduler)."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence

from hostd.config import ConfigError, load_config


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"balloon-hostd: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import zmq

    from hostd.server import HostServer

    try:
        server = HostServer(config)
    except (zmq.ZMQError, ValueError, OSError) as exc:
        print(f"balloon-hostd: cannot start: {exc}", file=sys.stderr)
        return 1
    logging.getLogger("hostd").info("effective configuration: %s", config)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    server.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
