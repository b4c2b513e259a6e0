"""The Stable Diffusion WebUI skin's logic (``dpagg_core.webui``) without a WebUI: a fake host,
a tiny diffusers model, real images, a real ledger. The extension script itself
(``scripts/dpagg_webui_tab.py``) is imported in a subprocess against stub ``modules``; the tab's
HTML (``scripts/dpagg_webui_html.py``) is loaded by its path, as the WebUI and the tab load it."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image
from tiny_models import tiny_pipeline

from dpagg_core import webui as core
from dpagg_core.aggregate.release import release_vectors
from dpagg_core.errors import BudgetExceeded, DpaggError
from dpagg_core.io.released_file import read_released
from dpagg_core.privacy import accountant, calibration
from dpagg_core.privacy.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent
HTML_SCRIPT = ROOT / "scripts" / "dpagg_webui_html.py"


def _load_by_path(name: str, path: Path):
    """A file of ``scripts/`` as the WebUI loads it (``script_loading.load_module``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


views = _load_by_path("dpagg_webui_html.py", HTML_SCRIPT)


def plan_shown(view: dict) -> str:
    """The plan view as the tab shows it."""
    return views.plan_html(view)


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
    assert "color:#d33" in plan_shown(view)
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

    release_vectors(
        Ledger(ledger),
        np.zeros((3, 4)),
        dataset_id=view["dataset_id"],
        plan=plan,
        clip_norm=0.5,
        center=None,
        centre_kind="origin",
        name="other",
    )
    view = core.plan_view(s, ledger=ledger)
    assert view["exceeds"] and "EXCEED" in plan_shown(view) and "#d33" in plan_shown(view)
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
    assert "mystyle" in views.report_html(report) and "privacy record" in views.report_html(report)

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
    # A copy or a symlink of the private folder is refused too, naming the files (issue 18.3:
    # the guard used to sit inside contextlib.suppress and never fired).
    shutil.copytree(tmp_path / "private", tmp_path / "copy")
    (tmp_path / "link").symlink_to(tmp_path / "private")
    for alias in ("copy", "link"):
        s = dataclasses.replace(s, public_images=str(tmp_path / alias))
        with pytest.raises(DpaggError, match="recorded as PRIVATE"):
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
    sc.on_ui_settings = lambda fn: registered.append("on_ui_settings")
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
    assert out["registered"] == ["on_ui_tabs", "on_ui_settings", "on_app_started"]
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
             on_ui_settings=lambda f: None, on_app_started=lambda f: None)
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
    tab.webui_host.api_embedding_dbs.append(WebuiDb("api"))
    done = tab.webui_host.reload_webui_embeddings()
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


# ----------------------------------------------------------------------------------------------
# Who may call the API, and what a request may read or spend (invariant 10)
# ----------------------------------------------------------------------------------------------

HOSTILE = "<img src=x onerror=alert(1)>.jpg"


def _basic(user: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_credentials_are_read_as_the_webui_reads_them():
    from dpagg_core import webui_access as wa

    assert wa.parse_api_auth("alice:s3cret,bob:p:w") == (("alice", "s3cret"), ("bob", "p:w"))
    assert wa.parse_api_auth(None) == () and wa.parse_api_auth("nocolon") == ()
    assert wa.parse_gradio_auth(" carol:pw , dan:x ", ["erin:y,"]) == (
        ("carol", "pw"),
        ("dan", "x"),
        ("erin", "y"),
    )
    opts = dataclasses.make_dataclass("Opts", ["api", "api_auth", "gradio_auth", "share"])
    rules = wa.ApiAccess.from_cmd_opts(opts(True, "a:b", "c:d", False))
    assert rules.enabled and rules.credentials == (("a", "b"),) and rules.source == "--api-auth"
    rules = wa.ApiAccess.from_cmd_opts(opts(False, None, "c:d", True))  # no --api-auth: the login
    assert not rules.enabled and rules.credentials == (("c", "d"),) and rules.tunnel
    assert rules.source == "--gradio-auth"
    rules = wa.ApiAccess.from_cmd_opts(opts(True, None, None, False), [("e", "f")])
    assert rules.credentials == (("e", "f"),)  # the WebUI's own get_gradio_auth_creds()
    creds = (("alice", "s3cret"), ("bob", "pässwörd"))
    assert wa.basic_auth_ok(_basic("alice", "s3cret"), creds)
    assert wa.basic_auth_ok(_basic("bob", "pässwörd"), creds)  # compared as bytes: any text
    for bad in (_basic("alice", "wrong"), _basic("bob", "s3cret"), "Basic !!", "Bearer x", None):
        assert not wa.basic_auth_ok(bad, creds)


@pytest.mark.parametrize(
    ("host", "headers", "tunnel", "local"),
    [
        ("127.0.0.1", {}, False, True),
        ("::1", {}, False, True),
        ("::ffff:127.0.0.1", {}, False, True),
        ("192.168.1.20", {}, False, False),
        ("203.0.113.9", {}, False, False),
        ("127.0.0.1", {"X-Forwarded-For": "203.0.113.9"}, False, False),  # a local proxy
        ("127.0.0.1", {"Forwarded": "for=203.0.113.9"}, False, False),
        ("127.0.0.1", {}, True, False),  # --share: the tunnel's remote users arrive locally
        ("testclient", {}, False, False),
        (None, {}, False, False),
    ],
)
def test_only_callers_on_this_machine_are_local(host, headers, tunnel, local):
    from dpagg_core import webui_access as wa

    assert wa.is_local_caller(host, headers, tunnel) is local


def test_decide_checks_credentials_then_site_then_content_type():
    from dpagg_core import webui_access as wa

    json_ct = {"content-type": "application/json; charset=utf-8"}
    authed = wa.ApiAccess(enabled=True, credentials=(("u", "p"),), source="--api-auth")
    ok = {"authorization": _basic("u", "p"), **json_ct}

    def decide(rules, host, headers, method="POST"):
        return wa.decide(rules, client_host=host, headers=headers, method=method)

    denial = decide(authed, "127.0.0.1", json_ct)  # credentials are needed even locally
    assert denial.status == 401 and denial.headers == {"WWW-Authenticate": "Basic"}
    assert "--api-auth" in denial.message
    assert decide(authed, "203.0.113.9", ok) is None  # with them, from anywhere
    assert decide(authed, "203.0.113.9", {**ok, "content-type": "text/plain"}).status == 415
    no_type = {"authorization": _basic("u", "p")}
    assert decide(authed, "203.0.113.9", no_type).status == 415
    assert decide(authed, "203.0.113.9", no_type, "GET") is None
    page = {**ok, "origin": "http://evil.example", "host": "127.0.0.1:7860"}
    assert decide(authed, "127.0.0.1", page).status == 403
    same = {**ok, "origin": "http://127.0.0.1:7860", "host": "127.0.0.1:7860"}
    assert decide(authed, "127.0.0.1", same) is None
    allowed = dataclasses.replace(authed, cors_origins=("http://evil.example",))
    assert decide(allowed, "127.0.0.1", page) is None  # the user let that site in

    open_ = wa.ApiAccess(enabled=True)
    denial = decide(open_, "192.168.1.20", json_ct)
    assert denial.status == 403 and "--api-auth" in denial.message
    assert decide(open_, "127.0.0.1", json_ct) is None
    assert decide(open_, "127.0.0.1", {"content-type": "text/plain"}).status == 415
    null_origin = {**json_ct, "origin": "null", "host": "127.0.0.1:7860"}
    assert decide(open_, "127.0.0.1", null_origin).status == 403


def test_folders_outside_the_roots_are_refused(tmp_path):
    from dpagg_core import webui_access as wa

    data = tmp_path / "webui"
    roots = wa.image_roots("", data)
    assert roots == [(data / "dpagg-private").resolve()]
    inside = make_images(data / "dpagg-private" / "style")
    wa.check_folder(str(inside), roots)
    wa.check_folder(str(data / "dpagg-private"), roots)
    wa.check_folder("", roots)  # left to "choose the folder of your PRIVATE images"
    outside = make_images(tmp_path / "elsewhere")
    link = data / "dpagg-private" / "link"
    link.symlink_to(outside, target_is_directory=True)
    for folder in (str(outside), "/etc", str(link), str(inside / ".." / ".." / "..")):
        with pytest.raises(DpaggError, match="dpagg_image_roots") as info:
            wa.check_folder(folder, roots)
        assert "outside the folders dpagg may read" in str(info.value)
    roots = wa.image_roots(f"{tmp_path / 'elsewhere'}\n ; {tmp_path / 'more'}", data)
    assert roots == [outside.resolve(), (tmp_path / "more").resolve()]
    wa.check_folder(str(outside), roots)
    wa.check_folder(str(link), roots)


def test_epsilon_cap_refuses_before_anything_runs(tmp_path, tiny_model_dir):
    from dpagg_core import webui_access as wa

    assert wa.max_epsilon(0) is None and wa.max_epsilon("") is None and wa.max_epsilon("x") is None
    assert wa.max_epsilon("8") == 8.0
    make_images(tmp_path / "private")
    ledger, out = tmp_path / "ledger.sqlite", tmp_path / "embeddings"
    for over, what in (
        ({"epsilon": 92}, "epsilon 92"),
        ({"budget_epsilon": 1000}, "budget_epsilon 1000"),
        ({"mode": "noise_multiplier", "noise_multiplier": 0.2}, "this plan's epsilon"),
    ):
        s = settings(tmp_path, tiny_model_dir, **over)
        host = FakeHost()
        with pytest.raises(DpaggError, match="dpagg_max_epsilon") as info:
            core.run(s, ledger=ledger, out_dir=out, host=host, max_epsilon=10.0)
        assert what in str(info.value) and "Nothing was spent" in str(info.value)
        assert host.events == []  # nothing loaded, trained or spent
        view = core.plan_view(s, ledger=ledger, max_epsilon=10.0)
        assert not view["ok"] and "dpagg_max_epsilon" in view["error"]
    assert not ledger.exists() or Ledger(ledger).list_releases() == []
    assert core.plan_view(settings(tmp_path, tiny_model_dir), ledger=ledger, max_epsilon=10)["ok"]


def test_error_html_escapes_a_hostile_file_name(tmp_path, tiny_model_dir):
    folder = make_images(tmp_path / "private")
    (folder / HOSTILE).write_bytes(b"not a jpeg")
    with pytest.raises(DpaggError, match="cannot be decoded") as info:
        core.run(
            settings(tmp_path, tiny_model_dir),
            ledger=tmp_path / "l.sqlite",
            out_dir=tmp_path / "e",
            host=FakeHost(),
        )
    shown = views.error_html(info.value, "<b>Nothing released:</b> ")
    assert "<img" not in shown and "&lt;img src=x onerror=alert(1)&gt;.jpg" in shown
    assert shown.count("<b>") == 1
    refused = views.refusal_html(info.value, {"images": str(folder), "epsilon": 2})
    assert "<img" not in refused and refused.count("<b>") == 1 and "Nothing released" in refused
    view = core.plan_view(settings(tmp_path, tiny_model_dir), ledger=tmp_path / "l.sqlite")
    assert "<img" not in plan_shown(view) and "&lt;img" in plan_shown(view)


def test_a_refusal_is_cleared_by_the_plan_refresh_only_once_the_fields_changed():
    """A refused run stays in red while the fields are those it was refused for (a plan refresh
    racing the run keeps it); once the user changed a field (e.g. set the missing budget) the
    plan refresh clears it, so it never sits under a plan that now fits. Other results (a
    release report, a C suggestion) are never cleared by a plan refresh."""
    asked = {"images": "/x", "epsilon": 2, "budget_epsilon": 0}
    refused = views.refusal_html("budget epsilon: choose the total epsilon", asked)
    assert not views.stale_refusal(refused, dict(asked))
    assert views.stale_refusal(refused, asked | {"budget_epsilon": 4})
    assert not views.stale_refusal("<div>released mystyle.safetensors</div>", asked)
    assert not views.stale_refusal("", asked) and not views.stale_refusal(None, asked)


# The extension script in a stub WebUI with a real FastAPI app, as A1111's webui.py builds it:
# ``on_app_started(demo, app)`` after its own API (only with --api). Requests go through
# starlette's TestClient from a chosen client address.
_API = textwrap.dedent(
    """
    import json, sys, threading, types
    cfg = json.loads(sys.argv[1])
    def mod(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m
    cmd = dict(api=False, nowebui=False, api_auth=None, gradio_auth=None, gradio_auth_path=None,
               share=False, cors_allow_origins=None, cors_allow_origins_regex=None,
               embeddings_dir=cfg["data"] + "/embeddings", ckpt_dir=None)
    cmd.update(cfg.get("cmd", {}))
    class State:
        interrupted = False
        def begin(self, job=""): pass
        def end(self): pass
        def interrupt(self): self.interrupted = True
    shared = mod("modules.shared", cmd_opts=types.SimpleNamespace(**cmd),
                 opts=types.SimpleNamespace(**cfg.get("opts", {})), state=State())
    sc = mod("modules.script_callbacks", on_ui_tabs=lambda f: None,
             on_ui_settings=lambda f: None, on_app_started=lambda f: None)
    ckpt = types.SimpleNamespace(filename=cfg["models"] + "/m.safetensors", title="m [0]")
    sd_models = mod("modules.sd_models", model_data=None, model_path=cfg["models"],
                    checkpoint_tiles=lambda: [ckpt.title], select_checkpoint=lambda: ckpt,
                    get_closet_checkpoint_match=lambda v: None)
    modules = mod("modules", script_callbacks=sc, shared=shared, sd_models=sd_models,
                  paths_internal=mod("modules.paths_internal", data_path=cfg["data"]),
                  call_queue=mod("modules.call_queue", queue_lock=threading.Lock()),
                  devices=mod("modules.devices", device="cpu"))
    sys.path.insert(0, sys.argv[2])
    import importlib.util
    spec = importlib.util.spec_from_file_location("dpagg_webui_tab.py", sys.argv[3])
    tab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tab)
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    app = FastAPI()
    tab.on_app_started(None, app)
    results = []
    for r in cfg.get("requests", []):
        client = TestClient(app, client=(r.get("client", "127.0.0.1"), 50000),
                            raise_server_exceptions=False)
        headers = dict(r.get("headers", {}))
        content = None
        if "json" in r:
            content = json.dumps(r["json"]).encode()
            if r.get("content_type", "application/json"):
                headers["content-type"] = r.get("content_type", "application/json")
        auth = tuple(r["auth"]) if r.get("auth") else None
        resp = client.request(r.get("method", "POST"), r["path"], content=content,
                              headers=headers, auth=auth)
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        results.append({"status": resp.status_code, "body": body,
                        "www": resp.headers.get("www-authenticate")})
    out = {"results": results}
    if "tab_run" in cfg:
        out["tab_run"] = tab.tab_run(cfg["tab_run"])
    print(json.dumps(out))
    """
)


def _webui_api(tmp_path: Path, requests: list[dict], **cfg) -> list[dict]:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")  # starlette's TestClient
    data, models = tmp_path / "webui", tmp_path / "webui" / "models" / "Stable-diffusion"
    models.mkdir(parents=True, exist_ok=True)
    config = {"data": str(data), "models": str(models), "requests": requests, **cfg}
    out = _run_script_with_stub_webui(_API, json.dumps(config), tmp_path)
    return out["results"] if "tab_run" not in cfg else out


def _root_images(tmp_path: Path) -> Path:
    return make_images(tmp_path / "webui" / "dpagg-private" / "style")


def test_api_routes_are_absent_without_api(tmp_path):
    images = str(_root_images(tmp_path))
    res = _webui_api(
        tmp_path,
        [
            {"method": "GET", "path": "/dpagg/v1/info"},
            {"path": "/dpagg/v1/run", "json": {"images": images}},
            {"path": "/dpagg/v1/budget", "json": {"images": images}},
        ],
        cmd={"api": False},
    )
    assert [r["status"] for r in res] == [404, 404, 404]


@pytest.mark.slow
def test_api_takes_the_webuis_api_auth_credentials(tmp_path):
    images = str(_root_images(tmp_path))
    outside = make_images(tmp_path / "elsewhere")
    (tmp_path / "webui" / "dpagg-private" / "link").symlink_to(outside)
    good, remote = ["alice", "s3cret"], "203.0.113.9"
    budget = {"path": "/dpagg/v1/budget", "auth": good, "client": remote}
    res = _webui_api(
        tmp_path,
        [
            {"method": "GET", "path": "/dpagg/v1/info"},  # 0: no credentials
            {"method": "GET", "path": "/dpagg/v1/info", "auth": ["alice", "wrong"]},
            {"path": "/dpagg/v1/run", "json": {"images": images, "epsilon": 92}},
            {"method": "GET", "path": "/dpagg/v1/info", "auth": good, "client": remote},
            {**budget, "json": {"images": images}},  # 4: OK
            {**budget, "json": {"images": images}, "content_type": "text/plain"},
            {**budget, "json": {"images": images}, "content_type": None},  # FastAPI 0.94: JSON
            {**budget, "json": {"images": str(outside)}},  # 7: out of the roots
            {**budget, "json": {"images": "/etc"}},
            {**budget, "json": {"images": str(Path(images).parent / "link")}},
            {**budget, "path": "/dpagg/v1/run", "json": {"images": images, "epsilon": 92}},
            {**budget, "path": "/dpagg/v1/run", "json": {"images": images, "budget_epsilon": 1e3}},
            {**budget, "path": "/dpagg/v1/plan", "json": {"images": images, "epsilon": 2}},
            {
                **budget,
                "path": "/dpagg/v1/run",
                "json": {"images": images},
                "headers": {"Origin": "http://evil.example"},
            },
            {**budget, "path": "/dpagg/v1/run", "json": {"images": images, "checkpoint": "/etc"}},
        ],
        cmd={"api": True, "api_auth": "alice:s3cret,bob:other"},
        opts={"dpagg_max_epsilon": 10.0},
    )
    status = [r["status"] for r in res]
    assert status == [401, 401, 401, 200, 200, 415, 415, 400, 400, 400, 400, 400, 200, 403, 400]
    assert res[0]["www"] == "Basic" and "--api-auth" in res[0]["body"]["detail"]
    assert res[3]["body"]["tab"] == "Private style (DP)"
    assert res[4]["body"]["n"] == 3 and res[4]["body"]["releases"] == 0
    assert "application/json" in res[5]["body"]["detail"]
    for r in res[7:10]:
        assert "dpagg_image_roots" in r["body"]["error"], r
    assert "dpagg_max_epsilon" in res[10]["body"]["error"] and "92" in res[10]["body"]["error"]
    assert "dpagg_max_epsilon" in res[11]["body"]["error"]
    assert res[12]["body"]["ok"] and res[12]["body"]["n"] == 3
    assert "cross-site" in res[13]["body"]["detail"]
    assert "outside the WebUI's checkpoint folders" in res[14]["body"]["error"]


@pytest.mark.slow
def test_without_credentials_only_callers_on_this_machine_are_served(tmp_path):
    images = str(_root_images(tmp_path))
    body = {"images": images}
    res = _webui_api(
        tmp_path,
        [
            {"path": "/dpagg/v1/run", "json": body, "client": "192.168.1.20"},
            {"path": "/dpagg/v1/budget", "json": body, "client": "203.0.113.9"},
            {"method": "GET", "path": "/dpagg/v1/info", "client": "192.168.1.20"},
            {"path": "/dpagg/v1/budget", "json": body, "headers": {"X-Forwarded-For": "1.2.3.4"}},
            {"path": "/dpagg/v1/budget", "json": body},  # 4: this machine
            {"path": "/dpagg/v1/budget", "json": body, "client": "::1"},
            {"path": "/dpagg/v1/budget", "json": body, "content_type": "text/plain"},
        ],
        cmd={"api": True},
    )
    assert [r["status"] for r in res] == [403, 403, 403, 403, 200, 200, 415]
    assert "--api-auth" in res[0]["body"]["detail"]
    assert res[4]["body"]["n"] == 3


@pytest.mark.slow
def test_without_api_auth_the_webui_login_is_required(tmp_path):
    images = str(_root_images(tmp_path))
    res = _webui_api(
        tmp_path,
        [
            {"path": "/dpagg/v1/budget", "json": {"images": images}},
            {"path": "/dpagg/v1/budget", "json": {"images": images}, "auth": ["carol", "pw"]},
            {
                "path": "/dpagg/v1/budget",
                "json": {"images": images},
                "auth": ["carol", "pw"],
                "client": "203.0.113.9",
            },
        ],
        cmd={"api": True, "gradio_auth": "carol:pw"},
    )
    assert [r["status"] for r in res] == [401, 200, 200]
    assert "--gradio-auth" in res[0]["body"]["detail"]


@pytest.mark.slow
def test_tab_escapes_a_hostile_file_name(tmp_path):
    folder = _root_images(tmp_path)
    (folder / HOSTILE).write_bytes(b"not a jpeg")
    out = _webui_api(
        tmp_path,
        [],
        cmd={"api": True},
        tab_run={"images": str(folder), "epsilon": 2, "preview": False},
    )
    preview, plan_html, result_html = out["tab_run"]
    assert preview is None and "Nothing released" in result_html
    for shown in (plan_html, result_html):
        assert "cannot be decoded" in shown and "<img" not in shown
        assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in shown


def test_identical_rerun_is_answered_untrained_even_when_training_is_not_reproducible(
    tmp_path, tiny_model_dir, monkeypatch
):
    """Issue 19 item 2 in the WebUI: the tab and the API run the core pipeline, so an identical
    request is answered from the ledger's record without training, whatever bits training made,
    also after the released file was deleted."""
    import torch

    from dpagg_core.training import ti

    make_images(tmp_path / "private")
    ledger, out = tmp_path / "ledger.sqlite", tmp_path / "embeddings"
    real, calls = ti.train_vectors, []

    def noisy(*args, **kwargs):
        calls.append(1)
        vectors, centre = real(*args, **kwargs)
        return {k: v + 1e-3 * torch.randn_like(v) for k, v in vectors.items()}, centre

    monkeypatch.setattr(ti, "train_vectors", noisy)
    s = settings(tmp_path, tiny_model_dir)
    first = core.run(s, ledger=ledger, out_dir=out, host=FakeHost())
    Path(first.file).unlink()
    again = core.run(s, ledger=ledger, out_dir=out, host=FakeHost())
    assert calls == [1] and again.reused and Path(again.file).exists()
    assert len(Ledger(ledger).list_releases()) == 1


def test_refusal_hint_reads_as_a_sentence(tmp_path):
    """Issue 20 item 9: the WebUI's raise hint is a noun phrase the ledger's "raise the budget
    deliberately with ..." can carry (it read "with from the extension folder ...")."""
    from dpagg_core.aggregate.release import release_vectors
    from dpagg_core.privacy.calibration import calibrate

    book = Ledger(tmp_path / "ledger.sqlite", raise_hint=core.raise_budget_hint)
    plan = calibrate(1.0, 1e-5, 4, "full")
    vecs = [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.0, 0.0]]
    release_vectors(book, vecs, dataset_id="ds-hint", plan=plan, clip_norm=1.0, name="a")
    with pytest.raises(BudgetExceeded) as info:
        book.check("ds-hint", plan)
    text = str(info.value)
    assert "deliberately with `" in text and "with from" not in text
    assert "ledger set-budget --ledger" in text and "extensions/dpagg" in text


def test_first_release_needs_a_deliberate_budget_and_spends_nothing_without(
    tmp_path, tiny_model_dir
):
    """Issue 20 item 10: with no budget recorded and ``budget_epsilon`` 0, the plan asks for one
    in red and a run is refused before anything loads; with one, the plan says what it sets."""
    make_images(tmp_path / "private")
    ledger, out = tmp_path / "ledger.sqlite", tmp_path / "embeddings"
    bare = settings(tmp_path, tiny_model_dir, budget_epsilon=0, budget_delta=0)
    view = core.plan_view(bare, ledger=ledger)
    assert view["ok"] and view["needs_budget"] and "dpagg-needs-budget" in plan_shown(view)
    assert "before its first release" in plan_shown(view)
    host = FakeHost()
    with pytest.raises(DpaggError, match="Nothing was spent"):
        core.run(bare, ledger=ledger, out_dir=out, host=host)
    assert host.events == [] and not out.exists()
    assert Ledger(ledger).list_releases() == []

    chosen = core.plan_view(settings(tmp_path, tiny_model_dir, budget_epsilon=6), ledger=ledger)
    assert not chosen["needs_budget"] and "sets the budget to epsilon 6" in plan_shown(chosen)
    # issue 21 item 2: the forecast for the tab's full space (1 vector x 768 values, SD1)
    assert chosen["forecast"]["k"] == 768 and chosen["forecast"]["verdict"] == "noise"
    assert "dpagg-forecast" in plan_shown(chosen) and "mostly noise" in plan_shown(chosen)


def test_an_identical_rerun_is_not_called_a_refusal(tmp_path, tiny_model_dir):
    """Issue 20 item 10: once the budget is used up, the plan for the identical request says it
    is answered from the record (no "will be refused"), and the run is indeed served; another
    plan is still shown as refused."""
    make_images(tmp_path / "private")
    ledger, out = tmp_path / "ledger.sqlite", tmp_path / "embeddings"
    s = settings(tmp_path, tiny_model_dir)  # budget epsilon 2 = this release's epsilon
    core.run(s, ledger=ledger, out_dir=out, host=FakeHost())
    view = core.plan_view(s, ledger=ledger)
    assert view["maybe_recorded"] and not view["exceeds"]
    assert "identical re-run" in plan_shown(view) and "EXCEED" not in plan_shown(view)
    assert core.run(s, ledger=ledger, out_dir=out, host=FakeHost()).reused
    other = core.plan_view(dataclasses.replace(s, epsilon=1.0), ledger=ledger)
    assert other["exceeds"] and not other["maybe_recorded"] and "EXCEED" in plan_shown(other)


def test_plan_waits_for_a_folder_and_shows_one_target(tmp_path, tiny_model_dir):
    """Issue 20 items 11-12: an empty folder field is a hint, not an error; typed fields
    recompute the plan when done (never per keystroke); only the chosen target is shown."""
    view = core.plan_view(settings(tmp_path, tiny_model_dir, images=""), ledger=tmp_path / "l")
    assert not view["ok"] and view["hint"] and "#d33" not in plan_shown(view)
    assert "change" not in core.PLAN_EVENTS["text"] and core.PLAN_EVENTS["choice"] == ("change",)
    assert core.target_fields(core.MODE_EPSILON) == {"epsilon": True, "noise_multiplier": False}
    assert core.target_fields(core.MODE_NOISE) == {"epsilon": False, "noise_multiplier": True}


@pytest.mark.parametrize("size", [64, 512])
def test_preview_grid_labels_fit_their_columns(tmp_path, size):
    """Issue 20 item 12: each label is drawn whole over its own column (a 64 px preview read
    "thout with emb"): the grid is enlarged until the wider label fits in one cell."""
    from PIL import ImageDraw

    from dpagg_core.showcase.preview import PREVIEW_LABELS

    pairs = [(Image.new("RGB", (size, size), "red"), Image.new("RGB", (size, size), "blue"))] * 2
    grid = Image.open(core.save_preview_grid(pairs, tmp_path / "grid.png"))
    cell = grid.width // 2
    probe = ImageDraw.Draw(grid)
    assert all(probe.textlength(label) < cell for label in PREVIEW_LABELS)
    assert grid.getpixel((cell // 2, grid.height - 2)) == (255, 0, 0)
    assert grid.getpixel((cell + cell // 2, grid.height - 2)) == (0, 0, 255)
    assert (cell == size) == (size == 512)


# ----------------------------------------------------------------------------------------------
# Rehearsal and public style folder (issue 21 items 1 and 3)
# ----------------------------------------------------------------------------------------------


def _with_a_private_copy(tmp_path: Path, ledger: Path, name: str) -> Path:
    """A PUBLIC-looking folder holding one picture the ledger records as private."""
    from dpagg_core.io.images import load_image_folder

    load_image_folder(tmp_path / "private", resolution=32, ledger=ledger)  # recorded as private
    mixed = make_images(tmp_path / name, count=4, shade=7)
    shutil.copy(tmp_path / "private" / "i0.png", mixed / "copy_i0.png")
    return mixed


def test_rehearsal_shows_three_epsilons_and_records_nothing(tmp_path, tiny_model_dir):
    from dpagg_core.rehearsal import REHEARSAL_RECORD, rehearsal_epsilons

    make_images(tmp_path / "private")
    public = make_images(tmp_path / "public", count=5, shade=7)
    ledger, out = tmp_path / "ledger.sqlite", tmp_path / "rehearsals"
    host = FakeHost()
    s = settings(tmp_path, tiny_model_dir, preview=True, preview_steps=2)
    got = core.rehearse(
        s, ledger=ledger, out_dir=out, host=host, public_folder=str(public), n=4, draws=2
    )
    eps = [r["epsilon"] for r in got["releases"]]
    assert eps == pytest.approx(rehearsal_epsilons(2.0), rel=1e-3)
    assert got["n"] == 4 and got["available"] == 5 and got["recipe"] is None
    for release in got["releases"]:
        assert len(release["files"]) == 2
        tensors, record = read_released(Path(release["files"][0]))
        assert record["rehearsal"] == REHEARSAL_RECORD and tensors["emb_params"].shape == (1, 32)
        assert Path(release["files"][0]).parent.parent == out  # never the embeddings folder
    assert Path(got["grid"]).is_file()  # rendered on dpagg's own copy of the checkpoint
    kinds = [e[0] for e in host.events]
    assert kinds.index("off") < kinds.index("restored") and "reload" not in kinds
    html_out = views.rehearsal_html(got)
    assert "nothing was spent" in html_out and "epsilon 4" in html_out
    assert Ledger(ledger).list_releases() == []
    # a public folder holding a picture recorded as private: refused before any model loads
    mixed = _with_a_private_copy(tmp_path, ledger, "mixed")
    refused = FakeHost()
    with pytest.raises(DpaggError, match="copy_i0.png"):
        core.rehearse(
            s, ledger=ledger, out_dir=out, host=refused, public_folder=str(mixed), n=2, draws=1
        )
    assert refused.events == []
    with pytest.raises(DpaggError, match="PUBLIC images only"):
        core.rehearse(
            s, ledger=ledger, out_dir=out, host=refused, public_folder=s.images, n=2, draws=1
        )
    with pytest.raises(DpaggError, match="holds 5 images"):
        core.rehearse(s, ledger=ledger, out_dir=out, host=refused, public_folder=str(public), n=9)
    assert refused.events == [] and Ledger(ledger).list_releases() == []


def test_public_style_folder_releases_in_its_basis_around_its_mean(tmp_path, tiny_model_dir):
    make_images(tmp_path / "private")
    style = make_images(tmp_path / "style", count=4, shade=7)
    ledger, out = tmp_path / "ledger.sqlite", tmp_path / "embeddings"
    s = settings(
        tmp_path,
        tiny_model_dir,
        public_style_folder=str(style),
        public_style_k=2,
        budget_epsilon=10,  # two releases
    )
    # the forecast counts the basis' K coordinates (k x vectors), not the full space
    assert core.plan_view(s, ledger=ledger)["forecast"]["k"] == 2
    plain = core.plan_view(dataclasses.replace(s, public_style_folder=""), ledger=ledger)
    assert plain["forecast"]["k"] == 768  # sd1, 1 vector: unchanged without a style folder
    report = core.run(s, ledger=ledger, out_dir=out, host=FakeHost())
    _, record = read_released(Path(report.file))
    assert record["basis_kind"] == "public_embeddings" and record["basis_k"] == "2"
    assert record["centre"] == "public_mean"
    assert report.recipe["clip_norm_source"] == "public style folder"
    assert float(record["clip_norm"]) == pytest.approx(report.recipe["clip_norm"])
    assert report.recipe["clip_norm"] != s.clip_norm
    assert "recipe: public" in views.report_html(report)
    # C set explicitly: the C field, still in the public basis around the public mean
    explicit = dataclasses.replace(s, clip_norm_from_style=False, name="explicit")
    again = core.run(explicit, ledger=ledger, out_dir=out, host=FakeHost())
    _, record = read_released(Path(again.file))
    assert float(record["clip_norm"]) == pytest.approx(0.5) and record["centre"] == "public_mean"


def test_public_style_folder_with_a_private_picture_spends_nothing(tmp_path, tiny_model_dir):
    make_images(tmp_path / "private")
    ledger, out = tmp_path / "ledger.sqlite", tmp_path / "embeddings"
    mixed = _with_a_private_copy(tmp_path, ledger, "style")
    host = FakeHost()
    s = settings(tmp_path, tiny_model_dir, public_style_folder=str(mixed), public_style_k=2)
    with pytest.raises(DpaggError, match="copy_i0.png"):
        core.run(s, ledger=ledger, out_dir=out, host=host)
    assert host.events == []  # refused before the checkpoint loads
    with pytest.raises(DpaggError, match="PUBLIC images only"):
        core.run(
            dataclasses.replace(s, public_style_folder=s.images),
            ledger=ledger,
            out_dir=out,
            host=host,
        )
    assert not out.exists() or not any(out.iterdir())
    assert Ledger(ledger).list_releases() == []


def test_rehearse_route_and_style_folder_stay_inside_the_roots(tmp_path):
    images = str(_root_images(tmp_path))
    outside = str(make_images(tmp_path / "elsewhere", shade=7))
    res = _webui_api(
        tmp_path,
        [
            {
                "path": "/dpagg/v1/rehearse",
                "json": {"images": images, "public_folder": outside, "n": 2},
            },
            {"path": "/dpagg/v1/run", "json": {"images": images, "public_style_folder": outside}},
        ],
        cmd={"api": True},
    )
    assert [r["status"] for r in res] == [400, 400]
    assert "public rehearsal folder" in res[0]["body"]["error"]
    assert "public style folder" in res[1]["body"]["error"]
    assert all("outside the folders dpagg may read" in r["body"]["error"] for r in res)
