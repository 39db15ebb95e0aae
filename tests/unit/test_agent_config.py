import pytest

from guestagent.config import ConfigError, load_config
from guestagent.wss import parse_referenced_bytes, touched_ratio


def test_env_then_flags():
    env = {"BALLOONLAB_VM_ID": "web", "BALLOONLAB_REPORT_INTERVAL": "2s", "BALLOONLAB_MEMSZ": "512MiB",
           "BALLOONLAB_HUGE_PAGES": "true"}
    cfg = load_config([], env)
    assert (cfg.vm_id, cfg.report_interval_ms, cfg.memsz_bytes, cfg.huge_pages) == ("web", 2000, 512 << 20, True)
    cfg = load_config(["--vm-id", "db", "--report-interval", "500ms"], env)
    assert (cfg.vm_id, cfg.report_interval_ms) == ("db", 500)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "vm_id"),
        (["--vm-id", "bad id"], "vm_id"),
        (["--vm-id", "a", "--report-interval", "soon"], "^--report-interval: 'soon' is not a duration"),
        (["--vm-id", "a", "--memsz", "abc"], "^--memsz: 'abc' is not a size"),  # the flag typed, not the field
        (["--vm-id", "a", "--batch-pages", "0"], "batch_pages"),
        (["--vm-id", "a", "--huge-pages", "maybe"], "--huge-pages"),
        (["--vm-id", "a", "--curve-client-key", "x"], "CurveZMQ"),
        (["--vm-id", "a", "--log-level", "LOUD"], "log_level"),
    ],
)
def test_invalid_config_names_the_setting(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv, {})


def test_smaps_referenced():
    text = "Rss:  1000 kB\nReferenced:   2048 kB\nAnonymous: 1 kB\n"
    assert parse_referenced_bytes(text) == 2 << 20
    assert parse_referenced_bytes("Rss: 1 kB\n") == 0
    assert touched_ratio(256 << 20, 512 << 20) == 0.5
    assert touched_ratio(1, 0) == 0.0
