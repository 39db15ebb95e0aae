"""Numeric limits of the protocol. A peer that exceeds one gets an error reply.

The frame limit is also set on every socket as ZMQ_MAXMSGSIZE, so an oversized frame is
dropped by libzmq before Python sees it.
"""

from __future__ import annotations

PROTOCOL_VERSION = 4  # 2: stats as an array named once by hello.stats_keys; 3: vm secrets, control tokens;
# 4: what the policy reads typed in status, behaviour-bearing settings typed in welcome and pushed (settings)

PAGE_SIZE_BYTES = 4096
PAGES_PER_MIB = (1 << 20) // PAGE_SIZE_BYTES
HUGE_PAGE_PAGES = 512  # one 2 MiB page = 512 base pages

MAX_FRAME_BYTES = 1 << 20  # 1 MiB per message on the agent plane
MAX_CONTROL_FRAME_BYTES = 32 << 20  # the control plane carries whole-host status documents (replies)
MAX_CONTROL_REQUEST_BYTES = 64 << 10  # and small requests: hostd's control socket takes no more
MAX_SEQ = (1 << 63) - 1
MAX_PAGE_NUMBER = 1 << 52  # 64-bit address space / 4 KiB: PFNs and VPNs both fit
MAX_MEMSZ_BYTES = 1 << 50  # 1 PiB: no guest is larger; anything above is a bug or an attack
MAX_PAGES = MAX_MEMSZ_BYTES // PAGE_SIZE_BYTES
MAX_RANGES_PER_MESSAGE = 32_768  # a lock/unlock batch: ≤ 32 768 (start, count) ranges
MAX_PAGES_PER_MESSAGE = 1 << 20  # and ≤ 4 GiB of pages
# A `pages` bin of MAX_RANGES_PER_MESSAGE ranges is at most this long: per range a gap varint
# below MAX_PAGE_NUMBER (52 bits: 8 bytes) and a count varint ≤ MAX_PAGES_PER_MESSAGE (21 bits:
# 3 bytes). A longer bin is refused before any of it is parsed.
MAX_PAGE_RANGES_WIRE_BYTES = MAX_RANGES_PER_MESSAGE * (
    -(-(MAX_PAGE_NUMBER - 1).bit_length() // 7) + -(-MAX_PAGES_PER_MESSAGE.bit_length() // 7)
)
MAX_RANGES_PER_VM = 1 << 20  # one vm's ledger: further lock ranges are REFUSED (≈ 4 GiB of single pages)
DEFAULT_BATCH_LIMIT_PAGES = 512  # vmw_balloon's batch: one page of 512 u64 entries
MAX_VM_ID_CHARS = 64
MAX_SECRET_CHARS = 128  # vm secrets and control tokens (url-safe base64)
MAX_TEXT_CHARS = 1024  # detail, reason, version strings
MAX_MAP_ENTRIES = 256  # stats, settings and parameter maps
MAX_KEY_CHARS = 64
MAX_INTERVAL_MS = 24 * 3600 * 1000  # a day: longer periods are certainly a unit mistake
MAX_SNAPSHOT_DEPTH = 6  # nesting of the control-plane status snapshot
MAX_SNAPSHOT_ITEMS = 2_000_000  # total scalars in one status snapshot (~40 000 vms)
