"""dp-accounting lives in the pack's own ``_deps/`` folder (issue 13: installing the pack changes
nothing else, ``pip check`` stays clean).

``install.py`` installs it there with ``pip install --no-deps --target <pack>/_deps`` only when
``dp_accounting`` is not importable (plain pip and the WebUI's ``launch.run_pip``; no network
here: pip is mocked), and ``dpagg_core`` appends that folder to ``sys.path`` only when it exists
and ``dp_accounting`` is not importable otherwise. The real install runs in ``.ci/comfyui``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _pack_install(pack: Path, monkeypatch, *, env_has_it: bool = False):
    """install.py loaded from a copy in ``pack``, with dp-accounting absent from the environment
    (unless ``env_has_it``)."""
    pack.mkdir(parents=True, exist_ok=True)
    for f in ("install.py", "requirements.txt"):
        shutil.copy(REPO / f, pack / f)
    name = f"_install_{pack.parent.name.replace(' ', '_')}"
    spec = importlib.util.spec_from_file_location(name, pack / "install.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not env_has_it:
        real = importlib.util.find_spec
        monkeypatch.setattr(
            mod.importlib.util,
            "find_spec",
            lambda name, *a: None if name == "dp_accounting" else real(name, *a),
        )
        real_version = mod._installed_version
        monkeypatch.setattr(
            mod,
            "_installed_version",
            lambda dist: None if dist == "dp-accounting" else real_version(dist),
        )
    return mod


def _dp_accounting_todo(mod) -> list:
    return [(s, e) for s, e in mod.missing() if s.startswith("dp-accounting")]


def _fake_target_install(deps: Path, version: str) -> None:
    """What ``pip install --target deps dp-accounting==version`` leaves behind."""
    (deps / "dp_accounting").mkdir(parents=True, exist_ok=True)
    (deps / "dp_accounting" / "__init__.py").write_text("FAKE = True\n")
    info = deps / f"dp_accounting-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: dp-accounting\nVersion: {version}\n"
    )


def test_install_targets_the_pack_local_folder_with_plain_pip(tmp_path, monkeypatch):
    pack = tmp_path / "custom_nodes" / "dpagg"
    mod = _pack_install(pack, monkeypatch)
    deps = pack / "_deps"
    target = ("--no-deps", "--upgrade", "--target", str(deps))
    assert _dp_accounting_todo(mod) == [("dp-accounting>=0.4.4", target)]

    monkeypatch.setitem(sys.modules, "launch", None)  # not the WebUI: plain pip
    calls = []
    monkeypatch.setattr(mod.subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw)))
    todo = _dp_accounting_todo(mod)
    monkeypatch.setattr(mod, "missing", lambda: todo)
    assert mod.main() == 0
    [(cmd, kw)] = calls
    assert cmd[:5] == [sys.executable, "-m", "pip", "install", "dp-accounting>=0.4.4"]
    assert cmd[cmd.index("--target") + 1] == str(deps) and "--no-deps" in cmd
    assert "--constraint" in cmd and kw == {"check": True}


def test_install_passes_the_target_through_the_webuis_run_pip(tmp_path, monkeypatch):
    pack = tmp_path / "extensions with space" / "dpagg"
    mod = _pack_install(pack, monkeypatch)
    ran = []
    launch = types.ModuleType("launch")
    launch.run_pip = lambda args, desc=None: ran.append(args)
    monkeypatch.setitem(sys.modules, "launch", launch)
    monkeypatch.setattr(mod.subprocess, "run", lambda *a, **k: pytest.fail("plain pip ran"))
    todo = _dp_accounting_todo(mod)
    monkeypatch.setattr(mod, "missing", lambda: todo)
    assert mod.main() == 0
    [args] = ran
    # one shell command line: the path (with a space) is quoted
    assert args.startswith('install "dp-accounting>=0.4.4" --no-deps --upgrade --target ')
    assert f'--target "{pack / "_deps"}"' in args and "--constraint " in args


def test_install_skips_what_is_already_there(tmp_path, monkeypatch):
    # already importable from the environment: nothing to install
    mod = _pack_install(tmp_path / "a" / "dpagg", monkeypatch, env_has_it=True)
    assert _dp_accounting_todo(mod) == []
    # already in _deps from an earlier run: no pip at every WebUI start (offline works)
    pack = tmp_path / "b" / "dpagg"
    mod = _pack_install(pack, monkeypatch)
    _fake_target_install(pack / "_deps", "0.4.4")
    assert _dp_accounting_todo(mod) == []
    # too old in _deps: replaced there
    pack = tmp_path / "c" / "dpagg"
    mod = _pack_install(pack, monkeypatch)
    _fake_target_install(pack / "_deps", "0.4.3")
    [(spec, extra)] = _dp_accounting_todo(mod)
    assert extra == ("--no-deps", "--upgrade", "--target", str(pack / "_deps"))


_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
before = list(sys.path)
import dpagg_core, dp_accounting
print(json.dumps({"before": before, "after": sys.path,
                  "fake": getattr(dp_accounting, "FAKE", False)}))
"""


def _probe(pack: Path, *, hide_site_packages: bool) -> dict:
    """Import a copy of dpagg_core from ``pack`` in a fresh interpreter; ``-S`` leaves out
    site-packages, so the dev venv's own dp_accounting is not importable."""
    flags = ["-S"] if hide_site_packages else []
    proc = subprocess.run(
        [sys.executable, *flags, "-c", _PROBE, str(pack)],
        capture_output=True,
        text=True,
        cwd=pack.parent,
        env={"PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    if proc.returncode:
        return {"error": proc.stderr}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dpagg_core_appends_deps_only_when_needed(tmp_path):
    pack = tmp_path / "dpagg"
    (pack / "dpagg_core").mkdir(parents=True)
    shutil.copy(REPO / "dpagg_core" / "__init__.py", pack / "dpagg_core" / "__init__.py")
    deps = pack / "_deps"

    # no _deps/ and no dp_accounting anywhere: nothing added, the import fails
    out = _probe(pack, hide_site_packages=True)
    assert "No module named 'dp_accounting'" in out["error"]

    _fake_target_install(deps, "0.4.4")
    # not importable otherwise: _deps is appended (at the end: it shadows nothing)
    out = _probe(pack, hide_site_packages=True)
    assert out["after"] == out["before"] + [str(deps)] and out["fake"] is True

    # importable from the environment (the dev venv has dp-accounting): _deps left out
    if importlib.util.find_spec("dp_accounting") is None:
        pytest.skip("dp-accounting is not installed in this environment")
    out = _probe(pack, hide_site_packages=False)
    assert out["after"] == out["before"] and out["fake"] is False
    assert str(deps) not in out["after"]
