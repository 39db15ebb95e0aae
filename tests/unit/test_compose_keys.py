"""The compose lab's key service: each guest gets only its own key, bound to its own vm id."""

from __future__ import annotations

import stat

from lab.compose_keys import main, provision
from protocol.keys import allowlist_entries, load_keypair


def test_each_guest_gets_its_own_key_bound_to_its_vm_and_keys_are_kept(tmp_path):
    guests = {vm: tmp_path / vm for vm in ("web", "db")}
    provision(tmp_path / "hostd", guests)
    entries = allowlist_entries(tmp_path / "hostd" / "allow")
    assert {name: set(e.vm_ids) for name, e in entries.items()} == {"web": {"web"}, "db": {"db"}}
    host_public = load_keypair(tmp_path / "hostd" / "host.key").public_key
    for vm, directory in guests.items():
        assert sorted(p.name for p in directory.iterdir()) == sorted([f"{vm}.key", f"{vm}.key_secret", "host.key"])
        assert load_keypair(directory / "host.key").public_key == host_public
        assert entries[vm].public_key == load_keypair(directory / f"{vm}.key_secret").public_key
        assert stat.S_IMODE((directory / f"{vm}.key_secret").stat().st_mode) == 0o600
    before = {vm: (d / f"{vm}.key_secret").read_bytes() for vm, d in guests.items()}
    assert all(line.endswith("kept") for line in provision(tmp_path / "hostd", guests))  # the next `up`
    assert before == {vm: (d / f"{vm}.key_secret").read_bytes() for vm, d in guests.items()}


def test_usage_errors(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["--hostd", str(tmp_path), "--guest", "web"])
    assert main(["--hostd", str(tmp_path / "h"), "--guest", f"web={tmp_path / 'w'}"]) == 0
