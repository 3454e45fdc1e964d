"""The import graph of src/zenlm: no cycles, and no lower layer importing a higher one (DESIGN.md).

Every import counts, also the ones inside functions (a lazy import only hides a cycle, it does not remove it);
imports under ``if TYPE_CHECKING:`` do not run and are left out. An edge goes to the module named, not to its
parent packages, so ``from zenlm.models.gpt import GPT`` is an edge to ``zenlm.models.gpt`` only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Layers, lowest first: a module may import modules of its own layer and of lower ones only.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("zenlm.errors", "zenlm.progress", "zenlm.device", "zenlm.fileio", "zenlm.config", "zenlm.chat_template",
              "zenlm.tokenizer", "zenlm.data", "zenlm.evaluate", "zenlm.viz", "zenlm.scoring", "zenlm.sampling",
              "zenlm.wordvec")),
    ("models", ("zenlm.models", "zenlm.presets")),
    ("train", ("zenlm.train",)),
    ("inference", ("zenlm", "zenlm.api", "zenlm.rundir", "zenlm.adapter", "zenlm.encoder", "zenlm.seq2seq",
                   "zenlm.generate", "zenlm.stateful", "zenlm.compiled", "zenlm.beam", "zenlm.convert", "zenlm.vae")),
    ("apps", ("zenlm.recipes", "zenlm.serve", "zenlm.lmeval")),
    ("cli", ("zenlm.cli", "zenlm.clikit", "zenlm.__main__")),
]
# Neighbours in one layer that must not import each other: the server calls generation, never a recipe.
APART = [("zenlm.recipes", "zenlm.serve")]


def module_files(src: Path, package: str = "zenlm") -> dict[str, Path]:
    """Module name -> file, for every .py file of ``package`` under ``src`` (a package is its __init__.py)."""
    out = {}
    for path in (src / package).rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            stack.extend(getattr(node, "orelse", []))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph(src: Path, package: str = "zenlm") -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (anywhere in its code)."""
    files = module_files(src, package)

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        edges: set[str | None] = set()
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges.update(known(a.name) for a in node.names if a.name.split(".")[0] == package)
                continue
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != package:
                continue
            for a in node.names:  # `from pkg import submodule` names a module; otherwise it names pkg's attribute
                edges.add(f"{base}.{a.name}" if f"{base}.{a.name}" in files else known(base))
        graph[mod] = {e for e in edges if e is not None and e != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[frozenset[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.add(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(frozenset(component))
    return found


def layer_of(module: str) -> int:
    """Index into LAYERS of the longest prefix that names ``module`` (KeyError when none does)."""
    best = (-1, -1)
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "zenlm" and module.startswith(prefix + ".")):
                best = max(best, (len(prefix), rank))
    if best[1] < 0:
        raise KeyError(module)
    return best[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Edges from a module to a module of a higher layer, or between modules kept APART."""
    bad = []
    for mod, targets in sorted(graph.items()):
        for t in sorted(targets):
            if layer_of(t) > layer_of(mod):
                bad.append(f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})")
            for a, b in APART:
                for x, y in ((a, b), (b, a)):
                    if (mod == x or mod.startswith(x + ".")) and (t == y or t.startswith(y + ".")):
                        bad.append(f"{mod} imports {t}; {x} and {y} stay apart")
    return bad


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(SRC)


def test_every_module_has_a_layer(graph: dict[str, set[str]]) -> None:
    unplaced = []
    for mod in graph:
        try:
            layer_of(mod)
        except KeyError:
            unplaced.append(mod)
    assert not unplaced, f"add these modules to a layer in LAYERS: {unplaced}"


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    found = set(cycles(graph))
    assert not found, f"import cycles: {[sorted(c) for c in found]}"


def test_no_lower_layer_imports_a_higher_one(graph: dict[str, set[str]]) -> None:
    assert not upward_imports(graph), "\n".join(upward_imports(graph))


def test_models_train_and_library_never_reach_up(graph: dict[str, set[str]]) -> None:
    """DESIGN.md's rules spelled out: models never import train/serve/cli/recipes; train never imports
    serve/cli/recipes; no library module imports the CLI."""
    def reaches(mod: str, prefixes: tuple[str, ...]) -> list[str]:
        return [t for t in graph[mod] if any(t == p or t.startswith(p + ".") for p in prefixes)]

    for mod in graph:
        if mod.startswith("zenlm.models"):
            assert not reaches(mod, ("zenlm.train", "zenlm.serve", "zenlm.cli", "zenlm.recipes")), mod
        if mod.startswith("zenlm.train"):
            assert not reaches(mod, ("zenlm.serve", "zenlm.cli", "zenlm.recipes")), mod
        if not (mod.startswith("zenlm.cli") or mod in ("zenlm.clikit", "zenlm.__main__")):
            assert not reaches(mod, ("zenlm.cli", "zenlm.clikit")), mod


def test_the_checks_find_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """The graph, cycle and layer checks on a made-up package: they must report what is wrong there."""
    pkg = tmp_path / "zenlm"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("def f():\n    from zenlm.train import loop\n")  # lazy, still counts
    (pkg / "train").mkdir()
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "train" / "loop.py").write_text("from ..models import a\nfrom zenlm.models.a import f\n")
    (pkg / "config.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import zenlm.cli\n")
    g = import_graph(tmp_path)
    assert g["zenlm.models.a"] == {"zenlm.train.loop"} and g["zenlm.train.loop"] == {"zenlm.models.a"}
    assert g["zenlm.config"] == set()
    assert cycles(g) == [frozenset({"zenlm.models.a", "zenlm.train.loop"})]
    assert upward_imports(g) == ["zenlm.models.a (models) imports zenlm.train.loop (train)"]
