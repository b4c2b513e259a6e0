"""What the Comfy Registry and ComfyUI-Manager read: pyproject, requirements, example workflows.

``.ci/comfyui`` also runs comfy-cli's ``comfy node validate`` and installs ``requirements.txt``
into a fresh ComfyUI venv (no installed package may change, ``pip check`` clean).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import tomllib
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def names(lines) -> set[str]:
    return {re.split(r"[<>=~!; \[]", x.strip(), maxsplit=1)[0].lower() for x in lines if x.strip()}


def test_requirements_match_the_package_and_pin_nothing_an_env_already_has():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = names(meta["project"]["dependencies"])
    req = [x for x in (REPO / "requirements.txt").read_text().splitlines() if x and x[0] != "#"]
    # ComfyUI's own torch; dp-accounting (pins attrs<24: a downgrade in ComfyUI, where aiohttp
    # brings a current attrs) comes from install.py with --no-deps into the pack's _deps/, its
    # other deps listed here.
    dp_accounting_deps = {"absl-py", "attrs", "dm-tree", "mpmath"}
    assert names(req) == (deps - {"torch", "dp-accounting"}) | dp_accounting_deps
    assert not {"dp-accounting", "clip-anytorch", "torchvision"} & names(req)
    assert all("==" not in x and "<" not in x for x in req), req


def test_install_py_adds_dp_accounting_without_its_pins(monkeypatch):
    import importlib.util
    import sys

    sys.path.insert(0, str(REPO))
    try:
        import install
    finally:
        sys.path.remove(str(REPO))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        install.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "dp_accounting" else real(name, *a),
    )
    monkeypatch.setattr(
        install,
        "_installed_version",
        lambda dist: None if dist == "dp-accounting" else "99",
    )
    monkeypatch.setattr(install, "_version_in", lambda folder, dist: None)  # no _deps/ yet
    todo = install.missing()
    # into the pack's own _deps/ (pip does not see it: `pip check` stays clean), not the env
    target = ("--no-deps", "--upgrade", "--target", str(REPO / "_deps"))
    assert ("dp-accounting>=0.4.4", target) in todo


def test_registry_metadata_and_template_thumbnails():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"].startswith("https://")
    assert "example_workflows" in comfy["includes"]
    workflows = sorted((REPO / "example_workflows").glob("*.json"))
    assert len(workflows) >= 2
    for wf in workflows:
        json.loads(wf.read_text())
        # ComfyUI's template browser asks for <name>.jpg next to each custom-node template
        thumb = wf.with_suffix(".jpg")
        assert thumb.is_file(), thumb
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and min(im.size) >= 256


def test_install_py_inside_comfyui_adds_no_clip_package(tmp_path, monkeypatch):
    """ComfyUI-Manager runs install.py in custom_nodes/<pack>: there the CLIP vocabulary comes
    from ComfyUI's tokenizer files, so clip-anytorch (which requires ftfy: `pip check` fails)
    is not installed; outside ComfyUI without a provider it still is."""
    import importlib.util
    import shutil

    real_find_spec = importlib.util.find_spec

    def no_clip(name, *args):
        return None if name in ("clip", "open_clip") else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", no_clip)

    def todo(root: Path) -> list:
        pack = root / "custom_nodes" / "dpagg"
        pack.mkdir(parents=True)
        for f in ("install.py", "requirements.txt"):
            shutil.copy(REPO / f, pack / f)
        spec = importlib.util.spec_from_file_location(f"_install_{root.name}", pack / "install.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return [s for s, _ in mod.missing()]

    comfy = tmp_path / "ComfyUI"
    (comfy / "comfy" / "sd1_tokenizer").mkdir(parents=True)
    (comfy / "comfy" / "sd1_tokenizer" / "vocab.json").write_text("{}")
    assert "clip-anytorch" not in todo(comfy)
    assert "clip-anytorch" in todo(tmp_path / "elsewhere")
