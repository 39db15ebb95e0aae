"""Regenerate the golden frames. Run only for a deliberate format change (and bump the
protocol version): python -m tests.data.make_golden"""

from pathlib import Path

from protocol import encode
from tests.samples import SAMPLES

GOLDEN_DIR = Path(__file__).parent / "golden"

if __name__ == "__main__":
    GOLDEN_DIR.mkdir(exist_ok=True)
    for seq, (kind, message) in enumerate(sorted(SAMPLES.items()), start=1):
        (GOLDEN_DIR / f"{kind}.bin").write_bytes(encode(message, seq))
    print(f"wrote {len(SAMPLES)} frames to {GOLDEN_DIR}")
