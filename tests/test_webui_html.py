"""Host text and HTML live next to the host (issue 19 item 3): ``dpagg_core`` returns data and
plain text, the WebUI tab's markup is ``scripts/dpagg_webui_html.py``. That file, like the tab's
other siblings (its Gradio layout ``dpagg_webui_layout.py``, its WebUI host
``dpagg_webui_host.py``; issue 19 item 4), is loaded as a script by AUTOMATIC1111 / Forge (every
``.py`` of ``scripts/``) and by the tab from its path, so loading it must be harmless and light."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TAB_SCRIPT = ROOT / "scripts" / "dpagg_webui_tab.py"

_TAGS = (
    "div|span|table|thead|tbody|tr|td|th|p|br|hr|b|i|u|em|strong|small|code|pre|a|img|ul|ol|li"
    "|h[1-6]|details|summary|label|input|button|form|style|script|iframe"
)
# An HTML tag: a known element, then only name=value attributes ("<a ledger's key>" and
# "<out_dir>/<name>.safetensors" in docstrings are placeholders, not markup).
HTML_TAG = re.compile(
    rf"</?(?:{_TAGS})(?:\s+[\w-]+=(?:'[^']*'|\"[^\"]*\"|[^\s>]+))*\s*/?>", re.IGNORECASE
)


def html_tags_in(text: str) -> list[str]:
    return [m.group(0) for m in HTML_TAG.finditer(text)]


def test_the_tag_finder_finds_markup_and_ignores_placeholders():
    marked = [
        "f\"<div class='dpagg-plan'>{x}</div>\"",
        '"<br>".join(lines)',
        "\"<span style='color:#d33;font-weight:bold'>\"",
        "f\"<table class='dpagg-record'>{rows}</table>\"",
        '"<p>" + text',
        "f\"<div class='{klass}'>\"",
        '"<b>Nothing released:</b> "',
        '"<tr><td>"',
    ]
    for line in marked:
        assert html_tags_in(line), line
    for line in (
        "written as ``<out_dir>/<name>.safetensors``",
        "dataset_id_for(digests, key=<a ledger's identity key>)",
        "the token ``<name>`` is added",
        "TOKEN = '<demo_style>'",
        "'a <shape> in the style'",
        "x < b and c > d",
    ):
        assert not html_tags_in(line), line


def html_in_package(root: Path) -> list[str]:
    """``file:line: tags`` of every HTML tag in ``root/dpagg_core``'s Python files."""
    found = []
    for path in sorted((root / "dpagg_core").rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if tags := html_tags_in(line):
                found.append(f"{path.relative_to(root).as_posix()}:{number}: {', '.join(tags)}")
    return found


def test_dpagg_core_holds_no_html():
    """Every markup string of a skin is host-side (``scripts/``, ``nodes/``): a tag anywhere in
    ``dpagg_core/`` fails, naming the file and line."""
    found = html_in_package(ROOT)
    assert not found, "HTML in dpagg_core (move it next to its host):\n" + "\n".join(found)


def test_the_check_fails_on_html_in_the_library(tmp_path):
    """The same scan over a package holding the old ``webui.py``'s lines fails, naming them."""
    package = tmp_path / "dpagg_core"
    package.mkdir()
    (package / "webui.py").write_text(
        '"""Writes ``<out_dir>/<name>.safetensors``."""\n'
        "def error_html(text):\n"
        "    return f\"<div class='dpagg-error' style='color:#d33'>{text}</div>\"\n"
        'ROW = "<tr><td>{k}</td><td>{v}</td></tr>"\n',
        encoding="utf-8",
    )
    found = html_in_package(tmp_path)
    assert [line.split(": ")[0] for line in found] == [
        "dpagg_core/webui.py:3",
        "dpagg_core/webui.py:4",
    ]


# What each file of scripts/ beside the tab offers (the tab loads them by path: ``_sibling``); a
# new sibling must be added here, so it gets the load test below.
SIBLINGS = {
    "dpagg_webui_html.py": (
        [],
        ["plan_html", "error_html", "report_html", "rehearsal_html", "suggest_html"],
    ),
    "dpagg_webui_layout.py": ([], ["build_tab", "error_tab", "add_settings"]),
    "dpagg_webui_host.py": (["WebuiHost"], ["loaded_model", "reload_webui_embeddings"]),
}


def test_every_sibling_of_the_tab_is_listed_and_loaded_by_the_tab():
    found = sorted(p.name for p in (ROOT / "scripts").glob("*.py") if p.name != TAB_SCRIPT.name)
    assert found == sorted(SIBLINGS)
    tab = TAB_SCRIPT.read_text(encoding="utf-8")
    for name in SIBLINGS:
        assert f'_sibling("{name.removesuffix(".py")}")' in tab


@pytest.mark.parametrize("name", sorted(SIBLINGS))
def test_a_sibling_script_loads_as_a_webui_script_without_heavy_imports(name):
    """Loaded alone, as the WebUI loads every file of ``scripts/`` (``importlib`` from its path,
    the file name as module name, the extension folder on ``sys.path``): no ``Script`` class, no
    callback registered (a stub ``script_callbacks`` records any), no WebUI module, no Gradio and
    no ``dpagg_core`` module (the WebUI restores ``sys.path`` after each script, which would drop
    the ``_deps`` folder ``dpagg_core/__init__`` appends, so the tab must be the first to import
    it)."""
    code = textwrap.dedent(
        """
        import importlib.util, inspect, json, sys, types
        registered = []
        modules = types.ModuleType("modules")
        sc = types.ModuleType("modules.script_callbacks")
        for hook in ("on_ui_tabs", "on_ui_settings", "on_app_started", "on_before_ui"):
            setattr(sc, hook, lambda fn, hook=hook: registered.append(hook))
        modules.script_callbacks = sc
        sys.modules.update({"modules": modules, "modules.script_callbacks": sc})
        before = set(sys.modules)
        sys.path.insert(0, sys.argv[1])
        spec = importlib.util.spec_from_file_location(sys.argv[3], sys.argv[2])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        heavy = sorted(
            name for name in set(sys.modules) - before
            if name.split(".")[0] in
            {"dpagg_core", "torch", "scipy", "dp_accounting", "modules", "gradio", "fastapi"}
        )
        classes = [n for n, v in vars(module).items()
                   if inspect.isclass(v) and v.__module__ == module.__name__]
        names = [n for n in json.loads(sys.argv[4]) if callable(getattr(module, n, None))]
        print(json.dumps({"heavy": heavy, "classes": classes, "names": names,
                          "registered": registered}))
        """
    )
    classes, names = SIBLINGS[name]
    script = ROOT / "scripts" / name
    done = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(script), name, json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == {"heavy": [], "classes": classes, "names": names, "registered": []}


@pytest.mark.parametrize("name", ["plan_html", "error_html", "rehearsal_html", "RunReport"])
def test_the_library_no_longer_offers_html(name):
    from dpagg_core import webui

    if name == "RunReport":
        assert not hasattr(webui.RunReport, "html")
    else:
        assert not hasattr(webui, name)
