"""Function-level imports in ``dpagg_core`` only where they keep a heavy library out (issue 19
item 7; the layer rule and the absence of import cycles are ``tests/test_layers.py``'s).

Since no import cycle is left between ``dpagg_core``'s modules (``test_layers`` counts lazy
imports too), an import inside a function has two remaining reasons, both about start-up time:
it keeps a heavy third-party library out of a module's import, or it keeps a module out of the
``dpagg --help`` start-up. (A host module -- ComfyUI, the WebUI, their web servers -- is a third,
but ``dpagg_core`` imports no host; the skins in ``nodes/`` and ``scripts/`` keep theirs lazy.)

**The rule** (:func:`misplaced_lazy_imports`, read from the source with :mod:`ast`): what a
module *loads* is the package modules and :data:`HEAVY` libraries its import brings in, computed
from top-level imports only (class bodies and module-level ``try`` included, ``if
TYPE_CHECKING:`` and function bodies not), transitively through ``dpagg_core``'s modules and
their parent packages, each library widened by :data:`IMPLIES`. An import inside a function of
module ``M`` (of a ``dpagg_core`` module, a third-party or a standard library one) fails the
test -- the message names the file, line and import and says "move it to the top" -- unless

1. it loads a heavy library that ``M`` does not load already, or
2. ``M`` is part of the start-up (what :data:`STARTUP`, ``dpagg --help`` and ``import
   dpagg_core``, loads) and the import loads a ``dpagg_core`` module the start-up does not.
   The command modules (``cli/*``) keep e.g. ``budget_report`` and ``paths`` lazy by this: moved
   to the top they cost ``dpagg --help`` about 6 ms of its ~70 ms (platformdirs, tempfile, the
   plan module), measured when this test landed.

Moving a flagged import never changes what any module loads that matters to these two
conditions, so one pass decides them all.

**Heavy** (:data:`HEAVY`, measured on the dev venv, ``python -c "import X"``): torch (~1-2 s),
diffusers (~2-4 s), transformers (~0.6-1 s), dp_accounting (~0.8 s, with scipy), scipy, numpy
(~0.2 s), ``safetensors.torch`` (loads torch), PIL and tqdm (light, ~0.05 s, but never needed by
a command that only parses arguments or accounts). Bare ``safetensors`` (``safe_open``, 0.02 s),
yaml and huggingface_hub are light and count as any module. :func:`test_implied_libraries_are_real`
checks :data:`IMPLIES` against a real import, so the table cannot claim a library loads
another it does not.

The start-up checks (:func:`test_light_entry_points_stay_light`): ``import dpagg_core`` and
``import dpagg_core.cli.parser`` (all that ``dpagg --help`` imports) load nothing heavy;
``import dpagg_core.privacy.accountant`` loads neither torch, diffusers nor transformers.

``python tests/test_lazy_imports.py`` prints the count of function-level imports by kind
(``dpagg_core`` modules, the pack's own modules, third-party, standard library, host) for
``dpagg_core/``, ``nodes/``, ``scripts/``, ``__init__.py`` and ``install.py``
(:func:`count_function_level_imports`).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dpagg_core"

HEAVY = frozenset(
    {
        "torch",
        "diffusers",
        "transformers",
        "dp_accounting",
        "scipy",
        "numpy",
        "safetensors.torch",
        "PIL",
        "tqdm",
    }
)
# A heavy library -> the heavy libraries its own import loads with it (checked by a real import).
IMPLIES = {
    "diffusers": frozenset({"torch", "numpy", "PIL", "safetensors.torch"}),
    "transformers": frozenset({"numpy", "PIL"}),
    "torch": frozenset({"numpy"}),
    "safetensors.torch": frozenset({"torch", "numpy"}),
    "dp_accounting": frozenset({"scipy", "numpy"}),
    "scipy": frozenset({"numpy"}),
}
# What `dpagg --help` and `import dpagg_core` import: the start-up of the command line.
STARTUP = ("dpagg_core.cli.parser", "dpagg_core")
# Modules that exist only inside a host (ComfyUI, the A1111 / Forge WebUI and their servers).
HOST = frozenset(
    {
        "comfy",
        "comfy_api",
        "comfy_extras",
        "folder_paths",
        "server",
        "modules",
        "gradio",
        "fastapi",
        "starlette",
        "backend",
        "aiohttp",
    }
)


def package_modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` under ``root``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def import_statements(path: Path) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """``(statement, inside a function)`` for every import of ``path`` that runs (those under
    ``if TYPE_CHECKING:`` never do and are left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                for sub in child.orelse:  # the else branch runs
                    walk(ast.Module(body=[sub], type_ignores=[]), in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append((child, in_function))
            walk(
                child,
                in_function
                or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)),
            )

    walk(tree, False)
    return out


def targets(
    node: ast.Import | ast.ImportFrom, importer: str, path: Path, modules: dict[str, Path]
) -> list[str]:
    """The dotted names ``node`` imports: a module of ``modules`` where it names one (``from pkg
    import submodule``), else the module the names come from; relative imports resolved."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        here = importer.split(".") if path.name == "__init__.py" else importer.split(".")[:-1]
        base = here[: len(here) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        out.append(sub if sub in modules else source)
    return out


def heavy_of_library(name: str) -> frozenset[str]:
    """The :data:`HEAVY` libraries importing the third-party module ``name`` loads."""
    found = set()
    for lib in HEAVY:
        if name == lib or name.startswith(lib + "."):
            found.add(lib)
            found |= IMPLIES.get(lib, frozenset())
    return frozenset(found)


class Closures:
    """What importing a module of one package loads (top-level imports, transitively): the
    package's modules (parent packages included) and the :data:`HEAVY` libraries."""

    def __init__(self, modules: dict[str, Path], package: str = PACKAGE) -> None:
        self.modules = modules
        self.package = package
        self._memo: dict[str, frozenset[str]] = {}

    def loads(self, name: str, visiting: frozenset[str] = frozenset()) -> frozenset[str]:
        """Package modules and heavy libraries that importing ``name`` loads."""
        if name.split(".")[0] != self.package:
            return heavy_of_library(name)
        parts = name.split(".")
        found: set[str] = set()
        for module in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
            if module in self.modules:
                found |= self._of_module(module, visiting)
        return frozenset(found)

    def heavy(self, name: str) -> frozenset[str]:
        return frozenset(x for x in self.loads(name) if x.split(".")[0] != self.package)

    def _of_module(self, module: str, visiting: frozenset[str]) -> frozenset[str]:
        if module in self._memo:
            return self._memo[module]
        if module in visiting:  # a top-level cycle; test_layers forbids it, do not recurse
            return frozenset({module})
        path = self.modules[module]
        found: set[str] = {module}
        for node, in_function in import_statements(path):
            if not in_function:
                for name in targets(node, module, path, self.modules):
                    found |= self.loads(name, visiting | {module})
        self._memo[module] = frozenset(found)
        return self._memo[module]


def misplaced_lazy_imports(
    root: Path = ROOT, package: str = PACKAGE, startup: tuple[str, ...] = STARTUP
) -> list[str]:
    """One line per function-level import of ``package`` that loads nothing heavy its module
    does not load already and, in a start-up module, no module the start-up does not load
    already (see the module docstring)."""
    modules = package_modules(root, package)
    closures = Closures(modules, package)
    at_startup = set().union(*(closures.loads(name) for name in startup))
    bad = []
    for module, path in modules.items():
        have = closures.heavy(module)
        for node, in_function in import_statements(path):
            if not in_function:
                continue
            names = targets(node, module, path, modules)
            if any(name.split(".")[0] in HOST for name in names):
                continue
            loads = set().union(*(closures.loads(name) for name in names))
            if module in at_startup and loads - at_startup:
                continue  # keeps a module out of `dpagg --help`
            if not {x for x in loads if x.split(".")[0] != package} - have:
                bad.append(
                    f"{path.relative_to(root)}:{node.lineno}: `{ast.unparse(node)}` loads nothing "
                    f"heavy that {module} does not load already "
                    f"({', '.join(sorted(have)) or 'nothing heavy'}): move it to the top"
                )
    return bad


def test_function_level_imports_keep_something_heavy_out():
    bad = misplaced_lazy_imports()
    assert not bad, "function-level imports with no heavy library to keep out:\n" + "\n".join(bad)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_the_rule_flags_a_needless_lazy_import_and_spares_a_needed_one(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/light.py": "import json\n",
            "pkg/heavy.py": "import torch\n",
            "pkg/sub/__init__.py": "import numpy\n",
            "pkg/sub/deep.py": "",
            "pkg/user.py": (
                "from typing import TYPE_CHECKING\n"
                "import numpy\n"
                "if TYPE_CHECKING:\n"
                "    import torch\n"
                "def f():\n"
                "    from pkg import light\n"  # line 6: needless
                "    from . import heavy\n"  # line 7: keeps torch out
                "    from pkg.sub import deep\n"  # line 8: numpy only, needless
                "    import scipy\n"  # line 9: keeps scipy out
                "    import comfy\n"  # line 10: a host module
                "    def g():\n"
                "        import json\n"  # line 12: needless
            ),
        },
    )
    bad = misplaced_lazy_imports(tmp_path, "pkg")
    lines = sorted(int(line.split(":")[1]) for line in bad)
    assert lines == [6, 8, 12], bad
    assert all("move it to the top" in line and "pkg/user.py" in line for line in bad)


def test_the_start_up_may_keep_a_module_out_but_not_one_it_loads(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/errors.py": "",
            "pkg/report.py": "import json\n",
            "pkg/cli.py": (
                "from pkg import errors\n"
                "def f():\n"
                "    from pkg import report\n"  # line 3: keeps report out of the start-up
                "    from pkg.errors import X\n"  # line 4: the start-up loads errors already
            ),
            "pkg/other.py": "def g():\n    from pkg import report\n",  # line 2: not start-up
        },
    )
    bad = misplaced_lazy_imports(tmp_path, "pkg", startup=("pkg.cli",))
    assert sorted(line.split(":")[0:2] for line in bad) == [
        ["pkg/cli.py", "4"],
        ["pkg/other.py", "2"],
    ], bad


def _loaded(statement: str) -> set[str]:
    """Top-level names in ``sys.modules`` after ``statement`` in a fresh interpreter."""
    code = f"import sys\n{statement}\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return set(out)


def _heavy_loaded(modules: set[str]) -> set[str]:
    return {lib for lib in HEAVY if lib in modules}


@pytest.mark.parametrize(
    ("statement", "must_not_load"),
    [
        ("import dpagg_core", HEAVY),
        ("import dpagg_core.cli.parser", HEAVY),  # all that `dpagg --help` imports
        ("import dpagg_core.privacy.accountant", {"torch", "diffusers", "transformers"}),
    ],
)
def test_light_entry_points_stay_light(statement, must_not_load):
    loaded = _heavy_loaded(_loaded(statement)) & set(must_not_load)
    assert not loaded, f"`{statement}` loads {sorted(loaded)}"


@pytest.mark.slow
def test_implied_libraries_are_real():
    """Each :data:`IMPLIES` entry: importing the library loads the libraries it lists (so the
    rule never asks to move an import that would load something new)."""
    procs = {
        lib: subprocess.Popen(
            [sys.executable, "-c", f"import sys, {lib}; print(' '.join(sys.modules))"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for lib in IMPLIES
    }
    missing = {}
    for lib, proc in procs.items():
        loaded = set(proc.communicate()[0].split())
        assert proc.returncode == 0, lib
        if not IMPLIES[lib] <= loaded:
            missing[lib] = sorted(IMPLIES[lib] - loaded)
    assert not missing, f"IMPLIES claims more than a real import loads: {missing}"


# --- counting (python tests/test_lazy_imports.py) ---


def count_function_level_imports(path: Path, package_dirs: tuple[str, ...] = ()) -> Counter:
    """Function-level import statements of one file by kind: ``dpagg_core`` (a module of the
    core), ``own`` (a relative import in a skin: its own package), ``host``, ``third-party``,
    ``stdlib``; and ``total``."""
    counts: Counter = Counter()
    for node, in_function in import_statements(path):
        if not in_function:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            kind = PACKAGE if PACKAGE in path.parts else "own"
        else:
            name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            top = (name or "").split(".")[0]
            if top == PACKAGE:
                kind = PACKAGE
            elif top in HOST:
                kind = "host"
            elif top in sys.stdlib_module_names:
                kind = "stdlib"
            else:
                kind = "third-party"
        counts[kind] += 1
        counts["total"] += 1
    return counts


def main() -> None:
    for target in ("dpagg_core", "nodes", "scripts", "__init__.py", "install.py"):
        path = ROOT / target
        files = [path] if path.is_file() else sorted(path.rglob("*.py"))
        counts: Counter = Counter()
        for file in files:
            counts += count_function_level_imports(file)
        kinds = ("total", PACKAGE, "own", "third-party", "stdlib", "host")
        print(f"{target:12} " + "  ".join(f"{k}={counts[k]}" for k in kinds))


if __name__ == "__main__":
    main()
