"""The layer rule of ``dpagg_core`` (docs: /DESIGN.md "Data flow and layout"; issue 19 item 1).

Reads the imports of every module under ``dpagg_core/`` with :mod:`ast` (module level, inside
functions and methods, under ``if TYPE_CHECKING:``: every ``import`` / ``from ... import``
statement, wherever it is) and checks:

1. **No import points up.** Each module sits in one layer; it imports only modules of its own
   layer or of a lower one.
2. **No import cycle** between modules (any layer, lazy imports included: a function-level
   import that closes a loop is still a loop).
3. ``dpagg_core`` never imports a host (ComfyUI, the WebUI) or the skins beside it.

The layer map, lowest first (rank in brackets):

* **privacy** (0): ``dpagg_core/privacy/*`` (``plan``, ``bounds``, ``plan_text`` and the
  ``accountant`` that re-exports them, ``calibration``, ``mechanism``, the ledger modules, ...)
  and the bottom helpers every layer shares:
  ``errors.py``, ``paths.py``, ``families.py`` (model families and their tensor keys),
  ``options.py`` (the user-facing choices) and the version constant ``dpagg_core.__version__``
  (``from dpagg_core import __version__`` is an import of that constant, not of the package's
  facade).
* **io** (1): ``dpagg_core/io/*`` (image decode, embedding sets, public embeddings, released
  files).
* **aggregate** (2): ``dpagg_core/aggregate/*`` (release, post-processing, public basis builders,
  choice of k and C, the ``subspace`` compatibility names).
* **training** (3): ``dpagg_core/training/*`` (``models`` loads a model; ``checkpoints``
  reads, detects and converts single-file checkpoints for it). The brief puts aggregate and
  training on one level that may import each other without cycles; which way the edges point is
  decided by what each needs: training's run drivers load a basis file and write a release
  (``train_run`` -> ``basis_builders``, ``dpsgd_run`` -> ``release``), while aggregation needs
  nothing from training since the model fingerprint lives in ``privacy.identity`` and
  ``train_public_embeddings`` in ``training.public``. So training sits above aggregate, as in
  DESIGN.md's diagram, and aggregate never imports training.
* **top** (4), pipeline and skins inside the package: the package ``__init__`` (the Python
  facade, ``dpagg_core.train`` etc.), ``showcase/*``, ``pipeline.py`` (train-then-release),
  the ``cli/`` package (``parser``, ``common``, commands by group), ``webui.py``,
  ``webui_access.py``, ``report.py``, ``budget_report.py``.

A module not in this map fails the test: place it (and document it here) when you add it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dpagg_core"

LAYERS = ("privacy", "io", "aggregate", "training", "top")
# Names of the package root that are constants of the bottom layer, not the facade.
BASE_ROOT_NAMES = frozenset({"__version__"})
VERSION_NODE = f"{PACKAGE}.__version__"
FORBIDDEN_TOP_LEVEL = frozenset(
    {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "modules", "nodes", "scripts"}
)


def layer_of(module: str) -> str:
    """The layer of a module (dotted name under ``dpagg_core``); KeyError if unplaced."""
    parts = module.split(".")
    assert parts[0] == PACKAGE
    rest = parts[1:]
    if module == VERSION_NODE:
        return "privacy"
    if not rest:
        return "top"  # the package __init__: the facade
    head = rest[0]
    if head in {"privacy", "errors", "paths", "families", "options"}:
        return "privacy"
    if head in {"io", "aggregate", "training"}:
        return head
    if head in {
        "showcase",
        "cli",
        "pipeline",
        "rehearsal",
        "webui",
        "webui_access",
        "webui_public",
        "webui_settings",
        "budget_report",
    }:
        return "top"
    raise KeyError(module)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(module: str, path: Path) -> list[tuple[int, str, str]]:
    """``(line, imported dotted name, statement)`` of every import in ``path``, resolved to a
    module of the package where it names one (``from pkg import submodule``), else to the
    package or module the names come from; absolute names outside the package as they are."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    here = module.split(".") if is_pkg else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((node.lineno, alias.name, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            text = f"from {'.' * node.level}{node.module or ''} import ..."
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:
                    found.append((node.lineno, sub, text))
                elif target == PACKAGE and alias.name in BASE_ROOT_NAMES:
                    found.append((node.lineno, VERSION_NODE, text))
                else:
                    found.append((node.lineno, target, text))
    return found


def _graph() -> dict[str, dict[str, tuple[int, str]]]:
    """module -> {imported package module: (line, statement)}."""
    graph: dict[str, dict[str, tuple[int, str]]] = {}
    for module, path in MODULES.items():
        edges: dict[str, tuple[int, str]] = {}
        for line, target, text in _imports(module, path):
            if target == VERSION_NODE or (target.split(".")[0] == PACKAGE and target != module):
                edges.setdefault(target, (line, text))
        graph[module] = edges
    return graph


GRAPH = _graph()


def test_every_module_has_a_layer():
    unplaced = []
    for module in MODULES:
        try:
            layer_of(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"place these modules in the layer map of tests/test_layers.py: {unplaced}"


def test_no_import_points_to_a_higher_layer():
    bad = []
    for module, edges in GRAPH.items():
        rank = LAYERS.index(layer_of(module))
        for target, (line, text) in sorted(edges.items()):
            if target not in MODULES and target != VERSION_NODE:
                bad.append(f"{MODULES[module]}:{line}: {text} names unknown module {target}")
                continue
            if LAYERS.index(layer_of(target)) > rank:
                bad.append(
                    f"{MODULES[module].relative_to(ROOT)}:{line}: {module} "
                    f"({layer_of(module)}) imports {target} ({layer_of(target)})"
                )
    assert not bad, "imports that point up a layer:\n" + "\n".join(bad)


def _cycles(graph: dict[str, dict[str, tuple[int, str]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles between modules (lazy imports included):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def test_core_never_imports_a_host_or_a_skin():
    bad = []
    for module, path in MODULES.items():
        for line, target, text in _imports(module, path):
            if target.split(".")[0] in FORBIDDEN_TOP_LEVEL:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {text}")
    assert not bad, "dpagg_core imports a host or a skin:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("graph", "cyclic"),
    [
        ({"a": {"b": (1, "")}, "b": {"a": (1, "")}}, True),
        ({"a": {"b": (1, "")}, "b": {"c": (1, "")}, "c": {"a": (1, "")}}, True),
        ({"a": {"b": (1, "")}, "b": {"c": (1, "")}, "c": {}}, False),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, cyclic):
    assert bool(_cycles(graph)) is cyclic


def test_the_reader_sees_lazy_and_type_checking_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from dpagg_core.training.ti import TIConfig\n"
        "def f():\n"
        "    from dpagg_core.aggregate import release\n"
        "    import dpagg_core.io.images\n"
        "from dpagg_core import __version__\n",
        encoding="utf-8",
    )
    targets = {t for _, t, _ in _imports("dpagg_core.privacy.m", src)}
    assert {
        "dpagg_core.training.ti",
        "dpagg_core.aggregate.release",
        "dpagg_core.io.images",
        VERSION_NODE,
    } <= targets


def test_front_end_choices_are_the_cores_own_tuples():
    """Issue 19 item 3: every ``choices=`` of the CLI is one of ``dpagg_core.options``' tuples
    (the same object the core validates against), so a front end can neither offer a choice the
    core refuses nor miss one it accepts."""
    import argparse

    from dpagg_core import options
    from dpagg_core.aggregate import postprocess, release
    from dpagg_core.cli.parser import build_parser
    from dpagg_core.privacy import basis, mechanism, plan

    tables = {id(v): k for k, v in vars(options).items() if isinstance(v, tuple)}
    assert release.CENTRES is options.CENTRES and mechanism.CLIP_MODES is options.CLIP_MODES
    assert plan.SAMPLINGS is options.SAMPLINGS
    assert postprocess.METHODS == options.POSTPROCESS + options.POSTPROCESS_WITH_PRIOR
    assert basis.KINDS is options.BASIS_KINDS
    seen = set()

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)
            elif action.choices is not None:
                assert id(action.choices) in tables, (parser.prog, action.dest, action.choices)
                seen.add(tables[id(action.choices)])

    walk(build_parser())
    assert {"SAMPLINGS", "CENTRES", "CLIP_MODES", "POSTPROCESS", "BASIS_KINDS"} <= seen
