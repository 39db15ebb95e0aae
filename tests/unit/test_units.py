import pytest

from protocol.units import format_bytes, parse_duration_ms, parse_size_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4096", 4096), ("512MiB", 512 << 20), ("2GiB", 2 << 30), ("1.5GiB", 3 << 29), ("64k", 64 << 10),
     ("128MB", 128 << 20), ("1 GiB", 1 << 30), ("0", 0)],
)
def test_sizes(text, expected):
    assert parse_size_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "-1MiB", "1PiB", "lots", "1.3B", "1 2"])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size_bytes(text)


@pytest.mark.parametrize(("text", "expected"), [("250", 250), ("250ms", 250), ("1.5s", 1500), ("1m", 60000),
                                                ("2h", 7_200_000)])
def test_durations(text, expected):
    assert parse_duration_ms(text) == expected


@pytest.mark.parametrize("text", ["", "5d", "-1s", "soon"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration_ms(text)


def test_format_bytes():
    assert format_bytes(512 << 20) == "512MiB"
    assert format_bytes(3 << 29, "GiB") == "1.5GiB"
    assert format_bytes(None) == "-"
