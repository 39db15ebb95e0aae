"""pyproject.toml lists its packages by name (no discovery): a new subpackage missing from the
list installs fine in an editable checkout and is absent from a wheel — the pip-based compose
image would fail at import time."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_package_directory_is_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    top = {name.split(".")[0] for name in listed}
    found = {".".join(init.parent.relative_to(REPO).parts) for name in top
             for init in (REPO / name).rglob("__init__.py")}
    assert found == listed, f"missing from pyproject: {sorted(found - listed)}; not a package: {sorted(listed - found)}"
