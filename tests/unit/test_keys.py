import pytest

from protocol.keys import (
    KeyFileError,
    allowlist_add,
    allowlist_public_keys,
    allowlist_remove,
    generate_keypair,
    load_keypair,
)


def test_generate_load_and_allowlist(tmp_path):
    public, secret = generate_keypair(tmp_path / "keys", "agent-web")
    assert (secret.stat().st_mode & 0o777) == 0o600
    pair = load_keypair(secret)
    assert len(pair.public_key) == 40 and pair.secret_key is not None
    assert load_keypair(public).secret_key is None
    allow = tmp_path / "allow"
    allowlist_add(allow, public, "web")
    assert allowlist_public_keys(allow) == {"web": pair.public_key}
    allowlist_remove(allow, "web")
    assert allowlist_public_keys(allow) == {}


def test_refuses_overwrite_and_bad_names(tmp_path):
    generate_keypair(tmp_path, "host")
    with pytest.raises(KeyFileError, match="already exists"):
        generate_keypair(tmp_path, "host")
    with pytest.raises(KeyFileError):
        generate_keypair(tmp_path, "../evil")
    with pytest.raises(KeyFileError, match="not found"):
        load_keypair(tmp_path / "missing.key")
