import pytest

from hostd.config import ConfigError, is_loopback_endpoint, load_config


def test_precedence_file_env_flags(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('idle_tax_ratio = 0.5\nbalance_period_ms = "5s"\nhost_memory_bytes = "1GiB"\n'
                      '[vms.db]\nshares = "high"\nreservation = "128MiB"\n')
    loaded = load_config(["--config", str(config)], {})
    assert (loaded.idle_tax_ratio, loaded.balance_period_ms, loaded.host_memory_bytes) == (0.5, 5000, 1 << 30)
    assert loaded.vms["db"].reservation_bytes == 128 << 20
    loaded = load_config(["--config", str(config)], {"BALLOONLAB_IDLE_TAX": "0.25"})
    assert loaded.idle_tax_ratio == 0.25
    loaded = load_config(["--config", str(config), "--idle-tax", "0.1"], {"BALLOONLAB_IDLE_TAX": "0.25"})
    assert loaded.idle_tax_ratio == 0.1


def test_sample_config_in_repo_loads():
    from pathlib import Path

    sample = Path(__file__).resolve().parents[2] / "hostd" / "balloonlab.sample.toml"
    loaded = load_config(["--config", str(sample)], {})
    assert loaded.idle_tax_ratio == 0.75 and loaded.vms["db"].shares == "high"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("idle_tax_ratio = 1.0", "0 ≤ τ < 1"),
        ("colour = 3", "unknown keys"),
        ('balance_period_ms = "soon"', "balance_period_ms"),
        ("[vms.db]\nshares = \"huge\"", "shares"),
        ("[vms.db]\nweight = 3", "unknown keys"),
        ("idle_tax_ratio = ", "config file"),
        ('curve_secret_key = "/x"', "CurveZMQ needs both"),
        ('[vms.db]\ncgroup = "../etc"', "below the cgroup hierarchy"),
        ('[vms.db]\ncgroup = "/"', "below the cgroup hierarchy"),
        ('block_max_ms = "50ms"', "block_max_ms"),
        ('vswap_step_bytes = "1KiB"', "vswap_step_bytes"),
    ],
)
def test_bad_config_is_named(tmp_path, toml, message):
    config = tmp_path / "c.toml"
    config.write_text(toml + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(["--config", str(config)], {})


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--idle-tax", "x"], {}, "^--idle-tax: "),
        (["--host-memory", "lots"], {}, "^--host-memory: "),
        ([], {"BALLOONLAB_IDLE_TAX": "x"}, "^BALLOONLAB_IDLE_TAX: "),
        ([], {"BALLOONLAB_SAMPLE_PERIOD": "soon"}, "^BALLOONLAB_SAMPLE_PERIOD: "),
    ],
)
def test_a_bad_value_is_named_as_the_user_gave_it(argv, environ, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv, environ)


def test_a_bad_value_in_the_config_file_names_the_file_and_key(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('idle_tax_ratio = "x"\n')
    with pytest.raises(ConfigError, match=f"^config file {config}: idle_tax_ratio: "):
        load_config(["--config", str(config)], {})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="No such file"):
        load_config(["--config", str(tmp_path / "nope.toml")], {})


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [("tcp://127.0.0.1:5555", True), ("tcp://localhost:1", True), ("tcp://[::1]:5", True),
     ("ipc:///tmp/x", True), ("tcp://0.0.0.0:5555", False), ("tcp://10.0.0.5:1", False), ("tcp://*:5555", False)],
)
def test_loopback(endpoint, loopback):
    assert is_loopback_endpoint(endpoint) is loopback


def test_vm_cgroups_and_host_swap_settings(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('block_max_ms = "0s"\nvswap_step_bytes = "32MiB"\n'
                      '[vms.web]\ncgroup = "balloonlab-lab/web"\nshares = "high"\n[vms.db]\nshares = "low"\n')
    loaded = load_config(["--config", str(config), "--vswap", "false"], {})
    assert loaded.vm_cgroups == {"web": "balloonlab-lab/web"} and loaded.vms["web"].shares == "high"
    assert loaded.block_max_ms == 0 and loaded.vswap_step_bytes == 32 << 20 and loaded.vswap is False


@pytest.mark.parametrize(("argv", "message"), [
    (["--control-endpoint", "tcp://0.0.0.0:5556"], "plain control endpoint must be on loopback"),
    (["--control-endpoint", "tcp://0.0.0.0:5556", "--allow-plain-remote", "true"], "must be on loopback"),
    (["--control-allowlist", "/tmp/ops"], "needs curve_secret_key"),
    (["--max-vms", "0"], "max_vms"),
    (["--dead-vm-ttl", "10ms"], "dead_vm_ttl_ms"),
])
def test_control_plane_and_bounds_are_checked_at_start(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv, {})


def test_ipc_control_and_settings_file_off():
    config = load_config(["--control-endpoint", "ipc:///run/x.sock", "--settings-file", "off"],
                         {"BALLOONLAB_CONTROL_SOCKET_MODE": "660"})
    assert config.settings_file is None and config.control_socket_mode == 0o660
