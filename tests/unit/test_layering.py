"""The layering stays one way: checked mechanically (style guide §3.1, review-architecture §2).

Every module's imports are walked with `ast`, top-level *and* function-local (a lazy import is
still a dependency: that is how the ctl ↔ lab cycle hid), and checked against the layers

    protocol  <-  hostd | guestagent  <-  lab <- balloonlab  <-  bench

An import may only go down a layer; hostd and guestagent never import each other; no module
imports another package's `_private` name; and no import cycle exists between modules.
The edges that break a rule today are listed below, each with why it is still there: the lists
may only shrink (a test fails when an entry is no longer needed, so it cannot go stale).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Lower number = lower layer. Same number: neither may import the other, unless listed in
# SAME_LAYER_ALLOWED (balloonlab builds on lab's topology).
LAYERS = {"protocol": 0, "cgroups": 0, "hostd": 1, "guestagent": 1, "lab": 2, "balloonlab": 3, "bench": 4,
          "balloonctl": 5}
SAME_LAYER_ALLOWED: set[tuple[str, str]] = set()

# Wrong-way edges still in the code: (importing module, imported module). Shrink only.
ALLOWED_WRONG_WAY: set[tuple[str, str]] = set()  # none left: balloonctl is its own package on top

# Module cycles still in the code, each as the set of its modules. Shrink only (none left:
# lab.cli renders the status table with hostd.render, not through hostd.ctl).
ALLOWED_CYCLES: set[frozenset[str]] = set()

PACKAGES = tuple(LAYERS)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module an imported name lives in (`from hostd import policy` → hostd.policy)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _type_only_lines(tree: ast.Module) -> set[int]:
    """Lines under `if TYPE_CHECKING:` (dependencies for the layering, not runtime cycles)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(module: str, path: Path) -> Iterator[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import anywhere in the file."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name)
                if target is not None:
                    yield target, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                target = _resolve(f"{source}.{alias.name}")
                if target is not None and target != module:
                    yield target, ([] if target == f"{source}.{alias.name}" else [alias.name]), node.lineno


def _package(module: str) -> str:
    return module.split(".")[0]


EDGES = {(module, target, line, tuple(names))
         for module, path in MODULES.items() for target, names, line in _imports(module, path)}
TYPE_ONLY = {(module, line) for module, path in MODULES.items()
             for line in _type_only_lines(ast.parse(path.read_text(), str(path)))}


def _wrong_way(source: str, target: str) -> bool:
    a, b = _package(source), _package(target)
    if a == b:
        return False
    return not (LAYERS[b] < LAYERS[a] or (a, b) in SAME_LAYER_ALLOWED)


def test_imports_go_down_the_layers_only():
    wrong = {(source, target) for source, target, _line, _names in EDGES if _wrong_way(source, target)}
    unexpected = sorted(wrong - ALLOWED_WRONG_WAY)
    assert not unexpected, f"imports against the layering {LAYERS}: {unexpected}"
    stale = sorted(ALLOWED_WRONG_WAY - wrong)
    assert not stale, f"fixed: remove from ALLOWED_WRONG_WAY: {stale}"


def test_hostd_and_guestagent_are_independent():
    crossing = sorted({(s, t) for s, t, _l, _n in EDGES
                       if {_package(s), _package(t)} == {"hostd", "guestagent"}} - ALLOWED_WRONG_WAY)
    assert not crossing


def test_no_private_names_across_packages():
    private = sorted(f"{source}:{line} imports {target}.{name}" for source, target, line, names in EDGES
                     for name in names
                     if _package(source) != _package(target) and name.startswith("_") and not name.startswith("__"))
    assert not private


def _cycles() -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative), over
    the imports that run (a cycle through `if TYPE_CHECKING:` never executes)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for source, target, line, _names in EDGES:
        if (source, line) not in TYPE_ONLY:
            graph[source].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.add(frozenset(component))
    return found


def test_no_import_cycles():
    cycles = _cycles()
    unexpected = [sorted(c) for c in cycles - ALLOWED_CYCLES]
    assert not unexpected, f"import cycles: {unexpected}"
    stale = [sorted(c) for c in ALLOWED_CYCLES - cycles]
    assert not stale, f"fixed: remove from ALLOWED_CYCLES: {stale}"


def test_the_walk_sees_lazy_imports():
    """The walker itself: a function-local import counts (balloonctl's lab import is one)."""
    assert any(source == "balloonctl.cli" and target == "lab.cli" for source, target, _l, _n in EDGES)
    assert any(source == "hostd.core" and target == "hostd.policy" for source, target, _l, _n in EDGES)


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
