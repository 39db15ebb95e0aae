"""extract-vmlinux.py VMLINUZ VMLINUX : the uncompressed kernel ELF out of Debian's bzImage (an
xz stream inside), which QEMU boots directly through PVH (seconds faster under TCG)."""

import lzma
import sys
from pathlib import Path

data = Path(sys.argv[1]).read_bytes()
offset = data.find(b"\xfd7zXZ\x00")
if offset < 0:
    sys.exit("no xz stream in the kernel image")
kernel = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[offset:])
if kernel[:4] != b"\x7fELF":
    sys.exit("the xz stream is not an ELF kernel")
Path(sys.argv[2]).write_bytes(kernel)
