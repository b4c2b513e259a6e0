"""The Stable Diffusion WebUI skin's logic (``dpagg_core.webui``) without a WebUI: a fake host,
a tiny diffusers model, real images, a real ledger. The extension script itself
(``scripts/dpagg_webui_tab.py``) is imported in a subprocess against stub ``modules``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image
from tiny_models import tiny_pipeline

from dpagg_core import webui as core
from dpagg_core.errors import BudgetExceeded, DpaggError
from dpagg_core.io.released_file import read_released
from dpagg_core.privacy import accountant, calibration
from dpagg_core.privacy.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    tiny_pipeline(hidden_size=32, seed=0).save_pretrained(folder)
    return folder


def make_images(folder: Path, count: int = 3, shade: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (40, 48), (40 * i + shade, 200 - 30 * i, 90)).save(folder / f"i{i}.png")
    return folder


class FakeHost:
    """Records what a run asks of the WebUI; ``cancel_after`` presses Interrupt after that many
    progress calls; ``family`` is the WebUI's loaded model family."""

    def __init__(self, family: str | None = "sd1", cancel_after: int | None = None) -> None:
        self.device = "cpu"
        self.family = family
        self.cancel_after = cancel_after
        self.events: list[tuple] = []

    def progress(self, done: int, total: int, text: str) -> None:
        self.events.append(("progress", done, total))

    def cancelled(self) -> bool:
        steps = sum(1 for e in self.events if e[0] == "progress" and e[1] > 0)
        return self.cancel_after is not None and steps >= self.cancel_after

    @contextlib.contextmanager
    def model_off_device(self):
        self.events.append(("off",))
        try:
            yield
        finally:
            self.events.append(("restored",))

    def reload_embeddings(self, path: Path) -> None:
        self.events.append(("reload", Path(path)))

    def loaded_family(self) -> str | None:
        return self.family


def settings(tmp_path: Path, model: Path, **over) -> core.Settings:
    values = {
        "images": str(tmp_path / "private"),
        "checkpoint": str(model),
        "name": "mystyle",
        "epsilon": 2,
        "delta": 1e-3,
        "clip_norm": 0.5,
        "steps": 2,
        "resolution": 32,
        "batch_size": 2,
        "vectors": 1,
        "preview": False,
        "budget_epsilon": 2,
        "budget_delta": 1e-3,
    }
    values.update(over)
    return core.settings_from_dict(values)


# ----------------------------------------------------------------------------------------------
# Settings, plan, paths
# ----------------------------------------------------------------------------------------------


def test_settings_convert_widget_values_and_refuse_bad_ones():
    s = core.settings_from_dict({"steps": "3", "epsilon": "1.5", "preview": "false", "m": 4.0})
    assert (s.steps, s.epsilon, s.preview, s.m) == (3, 1.5, False, 4)
    with pytest.raises(DpaggError, match="unknown setting"):
        core.settings_from_dict({"stepz": 3})
    with pytest.raises(DpaggError, match="steps"):
        core.settings_from_dict({"steps": 2.5})
    with pytest.raises(DpaggError, match="PUBLIC"):
        core.settings_from_dict({"clip_norm": 0})
    with pytest.raises(DpaggError, match="epsilon"):
        core.settings_from_dict({"epsilon": "nan"})
    with pytest.raises(DpaggError, match="mode"):
        core.settings_from_dict({"mode": "sigma"})


def test_defaults_are_the_clis():
    assert core.Settings().delta == accountant.DEFAULT_DELTA
    assert core.Settings().centre == "initializer" and core.Settings().sampling == "full"


def test_plan_is_the_accountants():
    s = core.settings_from_dict({"epsilon": 1, "delta": 1e-5})
    assert core.make_plan(s, 40) == calibration.calibrate(1.0, 1e-5, 40)
    s = core.settings_from_dict({"mode": "noise_multiplier", "noise_multiplier": 4})
    assert core.make_plan(s, 40) == accountant.epsilon_for(4.0, 1e-5, 40)
    s = core.settings_from_dict({"sampling": "wor", "m": 20, "epsilon": 1})
    assert core.make_plan(s, 40) == calibration.calibrate(1.0, 1e-5, 40, "wor", 20)
    with pytest.raises(DpaggError, match="needs m"):
        core.make_plan(core.settings_from_dict({"sampling": "wor"}), 40)


def test_ledger_path_honours_dpagg_ledger(tmp_path, monkeypatch):
    monkeypatch.setenv("DPAGG_LEDGER", str(tmp_path / "shared.sqlite"))
    assert core.ledger_path(tmp_path / "webui") == tmp_path / "shared.sqlite"
    monkeypatch.delenv("DPAGG_LEDGER")
    assert core.ledger_path(tmp_path / "webui") == tmp_path / "webui" / "dpagg" / "ledger.sqlite"


def test_family_mismatch_is_refused():
    core.check_family("sd1", "sd1")
    core.check_family("sdxl", None)  # nothing loaded: nothing to compare
    with pytest.raises(DpaggError, match="sdxl embedding cannot be used by an sd1 model"):
        core.check_family("sdxl", "sd1")


def test_plan_view_shows_errors_budget_and_red_when_exceeding(tmp_path, tiny_model_dir):
    ledger = tmp_path / "ledger.sqlite"
    empty = settings(tmp_path, tiny_model_dir, images=str(tmp_path / "none"))
    view = core.plan_view(empty, ledger=ledger)
    assert not view["ok"] and "does not exist" in view["error"]
    assert "color:#d33" in view["html"]
    (tmp_path / "emptydir").mkdir()
    view = core.plan_view(
        settings(tmp_path, tiny_model_dir, images=str(tmp_path / "emptydir")), ledger=ledger
    )
    assert not view["ok"] and "no images" in view["error"].lower()

    make_images(tmp_path / "private")
    s = settings(tmp_path, tiny_model_dir)
    view = core.plan_view(s, ledger=ledger)
    assert view["ok"], view["error"]
    assert view["n"] == 3 and view["budget"]["total"] is None and not view["exceeds"]
    assert view["next_release"]["epsilon"] == pytest.approx(view["plan"]["epsilon"])
    # spend the whole budget on this set: the next identical-plan release would be refused
    Ledger(ledger).set_budget(view["dataset_id"], 2.0, 1e-3)
    plan = core.make_plan(s, 3)
    import numpy as np

    Ledger(ledger).release(
        np.zeros((3, 4)),
        dataset_id=view["dataset_id"],
        plan=plan,
        clip_norm=0.5,
        center=None,
        centre_kind="origin",
        name="other",
    )
    view = core.plan_view(s, ledger=ledger)
    assert view["exceeds"] and "EXCEED" in view["html"] and "#d33" in view["html"]
    assert view["budget"]["spent"]["epsilon"] == pytest.approx(plan.epsilon)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def test_run_releases_reuses_and_refuses_over_budget(tmp_path, tiny_model_dir):
    make_images(tmp_path / "private")
    ledger, out = tmp_path / "ledger.sqlite", tmp_path / "embeddings"
    host = FakeHost()
    s = settings(tmp_path, tiny_model_dir)
    report = core.run(s, ledger=ledger, out_dir=out, host=host)

    path = Path(report.file)
    assert path.parent == out and report.prompt_word == report.name == "mystyle"
    tensors, record = read_released(path)
    assert set(tensors) == {"emb_params"} and tensors["emb_params"].shape == (1, 32)
    assert record["n"] == "3" and not report.reused
    assert report.budget["spent_epsilon"] == pytest.approx(report.plan["epsilon"])
    # the WebUI's model is off the device exactly while dpagg's copy trains, restored before
    # the release, and the embedding databases are reloaded with the new file
    kinds = [e[0] for e in host.events]
    assert kinds.index("off") < kinds.index("restored") < kinds.index("reload")
    assert host.events[-1] == ("reload", path)
    assert ("progress", 4, 4) in host.events  # 2 steps x 2 chunks (3 images, batch 2)
    assert "mystyle" in report.html() and "privacy record" in report.html()

    again = core.run(s, ledger=ledger, out_dir=out, host=FakeHost())
    assert again.reused and again.file == report.file
    assert again.budget["spent_epsilon"] == pytest.approx(report.budget["spent_epsilon"])
    assert sorted(p.name for p in out.iterdir()) == ["mystyle.safetensors"]

    other = FakeHost()  # a new request (another plan): refused before anything is loaded
    with pytest.raises(BudgetExceeded):
        core.run(dataclasses.replace(s, epsilon=3.0), ledger=ledger, out_dir=out, host=other)
    assert other.events == []
    # the same public request with another seed may have been a free re-run until trained:
    # the ledger refuses it after training, before any noise; nothing written or spent
    seeded = FakeHost()
    with pytest.raises(BudgetExceeded):
        core.run(dataclasses.replace(s, seed=1), ledger=ledger, out_dir=out, host=seeded)
    assert ("off",) in seeded.events and not any(e[0] == "reload" for e in seeded.events)
    assert sorted(p.name for p in out.iterdir()) == ["mystyle.safetensors"]
    assert Ledger(ledger).status(report.dataset_id)["releases"] == 1


def test_interrupt_spends_nothing_and_writes_nothing(tmp_path, tiny_model_dir):
    make_images(tmp_path / "private")
    ledger, out = tmp_path / "ledger.sqlite", tmp_path / "embeddings"
    host = FakeHost(cancel_after=1)
    with pytest.raises(core.Interrupted, match="nothing was spent"):
        core.run(settings(tmp_path, tiny_model_dir), ledger=ledger, out_dir=out, host=host)
    assert ("restored",) in host.events  # the WebUI's model is given back
    assert not out.exists() or not any(out.iterdir())
    assert Ledger(ledger).list_releases() == []
    assert core.error_status(core.Interrupted("x")) == 409


@pytest.mark.parametrize(
    ("over", "host_family", "match"),
    [
        ({"images": "EMPTY"}, "sd1", "no images"),
        ({"images": "CORRUPT"}, "sd1", "cannot be decoded"),
        ({}, "sdxl", "cannot be used by an sdxl model"),
        ({"name": "../evil"}, "sd1", "path separator"),
        ({"delta": 0.5}, "sd1", "delta"),
    ],
)
def test_bad_input_is_the_clis_error_and_spends_nothing(
    tmp_path, tiny_model_dir, over, host_family, match
):
    make_images(tmp_path / "private")
    if over.get("images") == "EMPTY":
        (tmp_path / "empty").mkdir()
        over = {**over, "images": str(tmp_path / "empty")}
    if over.get("images") == "CORRUPT":
        bad = make_images(tmp_path / "corrupt")
        (bad / "broken.png").write_bytes(b"not a png")
        over = {**over, "images": str(bad)}
    ledger, out = tmp_path / "ledger.sqlite", tmp_path / "embeddings"
    with pytest.raises(DpaggError, match=match) as info:
        core.run(
            settings(tmp_path, tiny_model_dir, **over),
            ledger=ledger,
            out_dir=out,
            host=FakeHost(family=host_family),
        )
    assert core.error_status(info.value) == 400
    assert not out.exists() or not any(out.iterdir())
    assert not ledger.exists() or Ledger(ledger).list_releases() == []


def test_suggest_clip_norm_uses_public_images_only(tmp_path, tiny_model_dir):
    make_images(tmp_path / "private")
    make_images(tmp_path / "public", count=2, shade=7)
    ledger = tmp_path / "ledger.sqlite"
    s = settings(tmp_path, tiny_model_dir, public_images=str(tmp_path / "private"))
    with pytest.raises(DpaggError, match="PUBLIC"):
        core.suggest_clip_norm(s, ledger=ledger, host=FakeHost())
    s = dataclasses.replace(s, public_images=str(tmp_path / "public"))
    out = core.suggest_clip_norm(s, ledger=ledger, host=FakeHost())
    assert out["n_public"] == 2 and out["clip_norm"] > 0
    assert out["distances"]["min"] <= out["clip_norm"] <= out["distances"]["max"]
    assert not ledger.exists() or Ledger(ledger).list_releases() == []


# ----------------------------------------------------------------------------------------------
# The extension script and install.py
# ----------------------------------------------------------------------------------------------

_STUBS = textwrap.dedent(
    """
    import json, sys, types
    registered = []
    modules = types.ModuleType("modules")
    sc = types.ModuleType("modules.script_callbacks")
    sc.on_ui_tabs = lambda fn: registered.append("on_ui_tabs")
    sc.on_app_started = lambda fn: registered.append("on_app_started")
    shared = types.ModuleType("modules.shared")
    modules.script_callbacks, modules.shared = sc, shared
    sys.modules.update({"modules": modules, "modules.script_callbacks": sc,
                        "modules.shared": shared})
    if sys.argv[1] == "missing":  # as if install.py had not run yet: not installed anywhere
        class _Absent:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("scipy", "attr", "dp_accounting", "platformdirs"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None
        sys.meta_path.insert(0, _Absent())
    sys.path.insert(0, sys.argv[2])
    import importlib.util
    spec = importlib.util.spec_from_file_location("dpagg_webui_tab.py", sys.argv[3])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    print(json.dumps({"registered": registered, "error": mod.IMPORT_ERROR}))
    """
)


def _run_script_with_stub_webui(code: str, mode: str, cwd: Path) -> dict:
    """Run ``code`` (a stub-WebUI driver) in a fresh interpreter on the extension's script; its
    last stdout line is JSON."""
    script = ROOT / "scripts" / "dpagg_webui_tab.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code, mode, str(ROOT), str(script)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("deps", ["present", "missing"])
def test_extension_script_imports_with_or_without_dependencies(tmp_path, deps):
    out = _run_script_with_stub_webui(_STUBS, deps, tmp_path)
    assert out["registered"] == ["on_ui_tabs", "on_app_started"]
    if deps == "present":
        assert out["error"] is None
    else:
        assert "No module named" in out["error"] and "install.py" in out["error"]


def test_extension_names_do_not_clash():
    scripts = sorted(p.name for p in (ROOT / "scripts").glob("*.py"))
    assert scripts and all(name.startswith("dpagg_") for name in scripts)
    js = sorted(p.name for p in (ROOT / "javascript").glob("*.js"))
    assert js and all(name.startswith("dpagg_") for name in js)
    assert "function dpagg" in (ROOT / "javascript" / "dpagg_webui.js").read_text()


def _load_install():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dpagg_install", ROOT / "install.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_install_runs_no_pip_when_everything_is_present(monkeypatch):
    install = _load_install()
    assert install.missing() == []
    monkeypatch.setattr(install, "install", lambda *a: pytest.fail("pip must not run"))
    assert install.main() == 0


def test_install_pins_what_the_webui_pins(monkeypatch):
    import importlib.metadata

    import torch

    install = _load_install()
    reqs = install.requirements()
    assert reqs and not {d for d, _, _ in reqs} & set(install.PROTECTED)
    monkeypatch.setattr(install, "requirements", lambda: [("no-such-dist", "1", "x>=1")])
    assert install.missing() == [("x>=1", ())]
    path = install.constraints_file()
    try:
        lines = Path(path).read_text().split()
    finally:
        os.unlink(path)
    assert f"torch=={importlib.metadata.version('torch')}" in lines
    assert torch.__version__.startswith(importlib.metadata.version("torch").split("+")[0])
    assert any(line.startswith("transformers==") for line in lines)
    assert any(line.startswith("diffusers==") for line in lines)
    calls = []
    monkeypatch.setattr(install, "install", lambda spec, extra, c: calls.append((spec, c)))
    install.main()
    assert calls and calls[0][0] == "x>=1" and not os.path.exists(calls[0][1])  # cleaned up


_RELOAD = textwrap.dedent(
    """
    import json, sys, types
    calls = []
    class ForgeDb:  # backend/text_processing/textual_inversion.py: no arguments
        def load_textual_inversion_embeddings(self):
            calls.append("model")
    class WebuiDb:  # modules/textual_inversion/textual_inversion.py
        def __init__(self, who):
            self.who = who
        def load_textual_inversion_embeddings(self, force_reload=False, sync_with_sd_model=True):
            calls.append((self.who, force_reload, sync_with_sd_model))
    def mod(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m
    engine = types.SimpleNamespace(embeddings=ForgeDb())
    info = types.SimpleNamespace(title="m.safetensors [abc]", filename="/m.safetensors")
    if sys.argv[1] == "forge":
        model = types.SimpleNamespace(text_processing_engine=engine, sd_checkpoint_info=info)
    else:  # A1111: the ldm model, one database in sd_hijack
        model = types.SimpleNamespace(sd_checkpoint_info=info)
    sd_models = mod("modules.sd_models", model_data=types.SimpleNamespace(sd_model=model))
    hijack = mod("modules.sd_hijack",
                 model_hijack=types.SimpleNamespace(embedding_db=WebuiDb("sd_hijack")))
    sc = mod("modules.script_callbacks", on_ui_tabs=lambda f: None,
             on_app_started=lambda f: None)
    shared = mod("modules.shared")
    modules = mod("modules", script_callbacks=sc, shared=shared, sd_models=sd_models,
                  sd_hijack=hijack)
    if sys.argv[1] == "forge":
        extra = mod("modules.ui_extra_networks_textual_inversion",
                    embedding_db=WebuiDb("extra"))
        modules.ui_extra_networks_textual_inversion = extra
    sys.path.insert(0, sys.argv[2])
    import importlib.util
    spec = importlib.util.spec_from_file_location("dpagg_webui_tab.py", sys.argv[3])
    tab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tab)
    tab._api_embedding_dbs.append(WebuiDb("api"))
    done = tab.reload_webui_embeddings()
    print(json.dumps({"done": done, "calls": calls}))
    """
)


@pytest.mark.parametrize("webui", ["forge", "a1111"])
def test_every_embedding_database_is_reloaded(tmp_path, webui):
    out = _run_script_with_stub_webui(_RELOAD, webui, tmp_path)
    if webui == "forge":  # the model's engine, the Extra Networks page's and the API's
        assert out["done"] == ["model:text_processing_engine", "extra_networks", "api"]
        assert out["calls"] == ["model", ["extra", True, False], ["api", True, False]]
    else:  # A1111: the one database, synced with the loaded model
        assert out["done"] == ["sd_hijack", "api"]
        assert out["calls"] == [["sd_hijack", True, True], ["api", True, False]]


def test_budget_refusals_name_the_way_that_works_in_the_webui():
    """The WebUI puts no `dpagg` command on PATH: a refusal names the module call instead."""
    from dpagg_core import webui

    hint = webui.raise_budget_hint(Path("/x/ledger.sqlite"), "ds-1")
    assert "-m dpagg_core.cli ledger set-budget --ledger /x/ledger.sqlite --dataset ds-1" in hint
    assert "extensions/dpagg" in hint
