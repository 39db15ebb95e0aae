"""The pure core stays pure: checked mechanically (style guide §3.1)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_protocol_loads_no_zmq():
    code = "import sys, protocol; print('zmq' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_only_codec_imports_msgpack():
    importers = sorted(
        str(path.relative_to(ROOT))
        for package in ("protocol", "hostd", "guestagent")
        for path in (ROOT / package).rglob("*.py")
        if "import msgpack" in path.read_text()
    )
    assert importers == ["protocol/codec.py"]
