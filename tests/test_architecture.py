"""The rooms of ARCHITECTURE.md hold: every module imports alone in a fresh interpreter, edge_runtime never pulls in
the trainer, the commands or torch, no import cycle exists among the project's modules (imports inside functions
included), and each room imports only the rooms below it.

The first check is python-zeroconf's tests/test_circular_imports.py idea; the others read the sources (``ast``).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edgerec", "edge_runtime", "trainer")

# What each room of edge_runtime may import (ARCHITECTURE.md). A module's room is its subpackage, or for a
# top-level module its own name.
ALLOWED = {
    "const": set(),
    "errors": set(),
    "config": {"const", "errors"},
    "rpc": {"const", "errors"},
    "scoring": {"const", "errors", "config"},
    "bundle": {"const", "errors", "scoring"},
    "events": {"const", "errors", "config"},
    "serving": {"const", "errors", "config", "rpc", "bundle", "scoring", "events"},
    "fleet": {"const", "errors", "config", "rpc", "bundle", "scoring", "events", "serving"},
    "ops": {"const", "errors", "config", "rpc", "bundle", "scoring", "events", "serving", "fleet"},
    "client": {"rpc"},
    "__init__": set(),
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts[-1] == "__main__":
                continue   # running it is the command itself, not an import
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, anywhere in its file (functions included, ``if TYPE_CHECKING:`` blocks
    excluded), resolved to absolute names; ``from pkg import sub`` counts ``pkg.sub`` when it is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            for a in node.names:
                found.add(f"{mod}.{a.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _project_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for imp in _imports(name, path):
            if imp in MODULES and imp != name:
                deps.add(imp)
        graph[name] = deps
    return graph


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_imports_alone_and_edge_runtime_stays_torch_free():
    code = ("import importlib, sys; m = sys.argv[1]; importlib.import_module(m); "
            "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'trainer', 'edgerec')); "
            "print('|'.join(bad))")

    def check(mod: str):
        r = subprocess.run([sys.executable, "-c", code, mod], capture_output=True, text=True, cwd=ROOT, timeout=300)
        return mod, r.returncode, r.stdout.strip(), r.stderr[-2000:]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(check, sorted(MODULES)))
    failed = [f"{m}: exit {rc}\n{err}" for m, rc, _, err in results if rc != 0]
    assert not failed, "modules that fail to import alone:\n" + "\n".join(failed)
    leaks = {m: out for m, rc, out, _ in results if m.split(".")[0] == "edge_runtime" and out}
    assert not leaks, f"edge_runtime modules that pull in torch / trainer / edgerec: {leaks}"
    assert len(results) >= 40


def test_edge_runtime_files_never_name_trainer_edgerec_or_torch():
    bad = {}
    for name, path in MODULES.items():
        if name.split(".")[0] != "edge_runtime":
            continue
        hits = sorted(i for i in _imports(name, path) if i.split(".")[0] in ("torch", "trainer", "edgerec"))
        if hits:
            bad[name] = hits
    assert not bad, bad


def test_no_import_cycles():
    graph = _project_graph()
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    counter = [0]

    def strongconnect(v: str) -> None:   # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            strongconnect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_a_cycle_is_detected_by_the_graph(tmp_path):
    """The cycle check reads function-level imports: a train <-> export style cycle hidden in a function is seen."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from .b import f\n")
    b.write_text("def g():\n    from .a import h\n")
    assert "pkg.b.f" in _imports("pkg.a", a) and "pkg.a" in _imports("pkg.b", b)


def test_packages_run_one_way():
    graph = _project_graph()
    order = {"trainer": {"edge_runtime"}, "edge_runtime": set(), "edgerec": {"trainer", "edge_runtime"}}
    bad = [(m, d) for m, deps in graph.items() for d in deps
           if d.split(".")[0] != m.split(".")[0] and d.split(".")[0] not in order[m.split(".")[0]]]
    assert not bad, f"imports against edgerec -> trainer -> edge_runtime: {bad}"


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_each_room_imports_only_the_rooms_below_it(room):
    graph = _project_graph()
    bad = []
    for m, deps in graph.items():
        if m.split(".")[0] != "edge_runtime" or _room(m) != room:
            continue
        for d in deps:   # the package itself ("from .. import const") is where every room lives, not a room
            if d.split(".")[0] == "edge_runtime" and d != "edge_runtime" and _room(d) not in ALLOWED[room] | {room}:
                bad.append((m, d))
    assert not bad, f"{room} may import {sorted(ALLOWED[room])}; found {bad}"


def test_edge_runtime_top_level_is_small_and_every_room_is_listed():
    top = sorted(p.name for p in (ROOT / "edge_runtime").glob("*.py"))
    assert len(top) <= 8, top
    rooms = {_room(m) for m in MODULES if m.split(".")[0] == "edge_runtime"}
    assert rooms <= set(ALLOWED), rooms - set(ALLOWED)


def test_architecture_md_names_the_file_of_each_concern():
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    owners = {"framing": "rpc/server.py", "dispatch": "rpc/methods.py", "scan": "scoring/__init__.py",
              "bundle reading": "bundle/format.py", "bundle writing": "bundle/writer.py",
              "signing": "bundle/signing.py", "sync": "fleet/sync.py", "routing": "fleet/routing.py",
              "lifecycle": "ops/daemon.py", "configuration": "config.py"}
    rows = [line.lower() for line in text.splitlines() if line.startswith("| ")]
    for concern, rel in owners.items():
        path = f"edge_runtime/{rel}"
        assert any(row.startswith(f"| {concern}") and f"`{path}`" in row for row in rows), (concern, path)
        assert (ROOT / path).is_file(), path
