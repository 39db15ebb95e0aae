"""hostd bounds PFN ledgers by the host's highest page frame, read from /proc/zoneinfo."""

from hostd.server import host_max_pfn

ZONEINFO = """Node 0, zone      DMA
  pages free     3840
        spanned  4095
        present  3998
  start_pfn:           1
Node 0, zone    DMA32
        spanned  1044480
  start_pfn:           4096
Node 0, zone   Normal
        spanned  5505024
  start_pfn:           1048576
Node 0, zone  Movable
  pages free     0
        spanned  0
  start_pfn:           0
"""


def test_the_highest_zone_end(tmp_path):
    path = tmp_path / "zoneinfo"
    path.write_text(ZONEINFO)
    assert host_max_pfn(path) == 1048576 + 5505024
    assert host_max_pfn(tmp_path / "missing") is None
