"""dpagg as a Stable Diffusion WebUI extension (AUTOMATIC1111 1.10 API; run in Forge).

A thin skin over ``dpagg_core``: the "Private style (DP)" tab (``script_callbacks.on_ui_tabs``),
its settings (``on_ui_settings``) and the ``/dpagg/v1/...`` routes (``on_app_started``). Every
decision lives in ``dpagg_core.webui`` and ``dpagg_core.webui_access`` (tested in CI without a
WebUI); the tab's HTML is ``dpagg_webui_html.py`` beside it. This file only talks to the WebUI:
its command-line options and settings, its progress state and Interrupt, its memory management,
its checkpoint list, its embedding databases, its txt2img for the preview grid.

The routes exist only when the WebUI serves its own API (``--api``) and are guarded as its own
routes are (``--api-auth``, else the WebUI's login; without credentials, callers on this machine
only): ``dpagg_core.webui_access`` says who may call them (docs/privacy.md, invariant 10).

The WebUI imports this file with the extension folder on ``sys.path``, so ``dpagg_core`` resolves
to the extension's copy. If a dependency is missing (``dp-accounting`` before ``install.py`` ran),
the import does not fail: the tab shows the error and the routes answer 503.
"""

from __future__ import annotations

import contextlib
import html
import inspect
import json
import os
from pathlib import Path
from typing import Any

from modules import script_callbacks, shared

try:  # the WebUI always has FastAPI; the routes' dependency needs ``Request`` at module level
    from fastapi import Request
except ImportError:  # pragma: no cover - only the CI's stub WebUI lacks it
    Request = Any  # type: ignore[misc,assignment]


def _sibling(name: str) -> Any:
    """``scripts/<name>.py`` loaded by its path, as the WebUI loads every file of ``scripts/``
    (never on ``sys.path``): the tab's HTML, ``dpagg_webui_html.py`` (its docstring: why)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


try:
    import dpagg_core.privacy.accountant  # noqa: F401 - needs scipy, attrs: fail here, not mid-run
    import dpagg_core.privacy.ledger  # noqa: F401
    from dpagg_core import options
    from dpagg_core import webui as core
    from dpagg_core import webui_access as access
    from dpagg_core.errors import DpaggError

    views = _sibling("dpagg_webui_html")
    IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - a broken install; shown in the tab
    core = views = None  # type: ignore[assignment]
    options = None  # type: ignore[assignment]
    access = None  # type: ignore[assignment]
    DpaggError = ValueError  # type: ignore[misc,assignment]
    IMPORT_ERROR = (
        f"dpagg cannot start: {type(exc).__name__}: {exc}. Fix: restart the WebUI so that the "
        "extension's install.py installs the missing packages (or run `pip install -r "
        "requirements.txt` of the extension in the WebUI's Python environment)."
    )
    print(f"[dpagg] {IMPORT_ERROR}")

ELEM = "dpagg"
_api_embedding_dbs: list[Any] = []  # the API's own embedding database (Forge keeps a separate one)


# ----------------------------------------------------------------------------------------------
# The WebUI behind dpagg_core.webui.Host
# ----------------------------------------------------------------------------------------------


def _loaded_model() -> Any:
    """The WebUI's loaded model without triggering a load (None if none is loaded)."""
    from modules import sd_models

    data = getattr(sd_models, "model_data", None)
    model = getattr(data, "sd_model", None) if data is not None else None
    if model is None or getattr(model, "sd_checkpoint_info", None) is None:
        return None
    return model


def _is_forge() -> bool:
    try:
        import backend.memory_management  # noqa: F401

        return True
    except ImportError:
        return False


def _call_reload(db: Any, *, sync: bool = False) -> None:
    """``load_textual_inversion_embeddings`` of A1111's database (``force_reload``; ``sync``:
    re-read the expected width from the loaded model, only for the model's own database) or of
    Forge's backend one (no arguments)."""
    fn = db.load_textual_inversion_embeddings
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {}
    if "force_reload" in params:
        kwargs["force_reload"] = True
    if "sync_with_sd_model" in params:
        kwargs["sync_with_sd_model"] = sync
    fn(**kwargs)


def reload_webui_embeddings() -> list[str]:
    """Reload every embedding database the WebUI uses, so a new file works without a restart:
    the loaded model's (Forge: its text-processing engines; A1111: ``sd_hijack``'s), the Extra
    Networks page's and the API's (``/sdapi/v1/embeddings``)."""
    done: list[str] = []
    model = _loaded_model()
    for attr in ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g"):
        engine = getattr(model, attr, None) if model is not None else None
        if engine is not None and getattr(engine, "embeddings", None) is not None:
            _call_reload(engine.embeddings)
            done.append(f"model:{attr}")
    with contextlib.suppress(ImportError, AttributeError):
        from modules import sd_hijack

        db = sd_hijack.model_hijack.embedding_db
        if model is not None and not done:
            _call_reload(db, sync=True)
            done.append("sd_hijack")
    with contextlib.suppress(ImportError, AttributeError):
        from modules import ui_extra_networks_textual_inversion as extra

        if getattr(extra, "embedding_db", None) is not None:
            _call_reload(extra.embedding_db)
            done.append("extra_networks")
    for db in _api_embedding_dbs:
        _call_reload(db)
        done.append("api")
    return done


class WebuiHost:
    """``dpagg_core.webui.Host`` over the running WebUI."""

    def __init__(self) -> None:
        from modules import devices

        self.device = str(getattr(devices, "device", "cpu"))

    def progress(self, done: int, total: int, text: str) -> None:
        st = shared.state
        st.job_count = 1
        st.job_no = 0
        st.sampling_steps = max(1, int(total))
        st.sampling_step = int(done)
        st.textinfo = text

    def cancelled(self) -> bool:
        return bool(getattr(shared.state, "interrupted", False))

    @contextlib.contextmanager
    def model_off_device(self):
        """Forge: its memory manager unloads every model from the GPU and loads the WebUI's model
        back by itself at the next generation. A1111: ``sd_models.send_model_to_cpu`` (lowvram
        aware) before, ``send_model_to_device`` after. Nothing to do on CPU."""
        if not self.device.startswith(("cuda", "xpu", "mps")):
            yield
            return
        from modules import sd_models

        model = _loaded_model()
        if _is_forge():
            from backend import memory_management

            memory_management.unload_all_models()
            memory_management.soft_empty_cache()
            yield
            return
        if model is not None:
            sd_models.send_model_to_cpu(model)
        try:
            yield
        finally:
            if model is not None:
                sd_models.send_model_to_device(model)

    def reload_embeddings(self, path: Path) -> None:
        done = reload_webui_embeddings()
        print(f"[dpagg] released {path.name}; reloaded embedding databases: {', '.join(done)}")

    def loaded_family(self) -> str | None:
        model = _loaded_model()
        if model is None:
            return None
        if getattr(model, "is_sdxl", False):
            return "sdxl"
        if getattr(model, "is_sd2", False):
            return "sd2"
        if getattr(model, "is_sd1", False):
            return "sd1"
        return None


# ----------------------------------------------------------------------------------------------
# WebUI locations and checkpoints
# ----------------------------------------------------------------------------------------------


def _data_dir() -> str:
    from modules import paths_internal

    return paths_internal.data_path


def ledger_path() -> Path:
    return core.ledger_path(_data_dir())


def embeddings_dir() -> Path:
    return Path(shared.cmd_opts.embeddings_dir)


def image_roots() -> list[Path]:
    """The folders the tab and the routes may read images from (the setting, else
    ``<data dir>/dpagg-private``)."""
    return access.image_roots(getattr(shared.opts, access.SETTING_ROOTS, ""), _data_dir())


def max_epsilon() -> float | None:
    return access.max_epsilon(getattr(shared.opts, access.SETTING_MAX_EPSILON, 0))


def checkpoint_choices() -> list[str]:
    from modules import sd_models

    return list(sd_models.checkpoint_tiles())


def loaded_checkpoint_title() -> str:
    model = _loaded_model()
    if model is not None:
        return str(model.sd_checkpoint_info.title)
    return str(getattr(shared.opts, "sd_model_checkpoint", "") or "")


def resolve_checkpoint(value: str) -> str:
    """A checkpoint title of the WebUI's list, a file/folder path, or '' (the loaded model /
    the selected one) -> a path for ``dpagg_core.training.models``."""
    from modules import sd_models

    value = (value or "").strip()
    if not value:
        model = _loaded_model()
        if model is not None:
            return str(model.sd_checkpoint_info.filename)
        info = sd_models.select_checkpoint()
        if info is None:
            raise DpaggError("no checkpoint is loaded or selected; choose one in the WebUI")
        return str(info.filename)
    if os.path.exists(value):
        return _checkpoint_path(value)
    info = sd_models.get_closet_checkpoint_match(value)
    if info is None:
        raise DpaggError(f"checkpoint {value!r} is not in the WebUI's list nor a file path")
    return str(info.filename)


def _checkpoint_path(value: str) -> str:
    """A checkpoint given as a path: only inside the WebUI's checkpoint folders (``--ckpt-dir``,
    ``models/Stable-diffusion``) or the image roots, so a request cannot make dpagg open (or
    report on) any other file of the machine."""
    from modules import sd_models

    folders = [getattr(sd_models, "model_path", None), getattr(shared.cmd_opts, "ckpt_dir", None)]
    roots = [access.real_path(f) for f in folders if f] + image_roots()
    if not access.within(value, roots):
        raise DpaggError(
            f"checkpoint {value} is outside the WebUI's checkpoint folders "
            f"({', '.join(map(str, roots))}). Fix: put it in models/Stable-diffusion (or "
            "--ckpt-dir) and choose it from the list"
        )
    return value


def settings(values: dict[str, Any]):
    """The request's settings, refused before anything runs when they ask for more than this
    WebUI allows: an epsilon or a new budget above the cap, a folder outside the image roots."""
    import dataclasses

    s = core.settings_from_dict(values)
    core.check_epsilon_caps(s, max_epsilon())
    roots = image_roots()
    access.check_folder(s.images, roots, "image folder")
    access.check_folder(s.public_images, roots, "public image folder")
    access.check_folder(s.public_style_folder, roots, "public style folder")
    return dataclasses.replace(s, checkpoint=resolve_checkpoint(s.checkpoint))


# ----------------------------------------------------------------------------------------------
# Actions shared by the tab and the routes
# ----------------------------------------------------------------------------------------------


def plan(values: dict[str, Any]) -> dict[str, Any]:
    try:
        s = settings(values)
    except DpaggError as exc:
        view = {"ok": False, "error": str(exc), "exceeds": False}
    else:
        view = core.plan_view(
            s,
            ledger=ledger_path(),
            loaded_family=WebuiHost().loaded_family(),
            max_epsilon=max_epsilon(),
        )
    return {**view, "html": views.plan_html(view)}


def generate_preview(word: str, steps: int, size: int, out: Path, card: Path | None = None) -> Path:
    """With/without grid rendered by the WebUI's own txt2img (released embedding only), written
    to ``out``; ``card``: also the first picture WITH the embedding, alone (the Extra Networks
    card's thumbnail)."""
    from modules import processing

    model = _loaded_model() or shared.sd_model
    if not size:
        size = 1024 if getattr(model, "is_sdxl", False) else 512
    pairs = []
    for plain, styled in core.preview_prompts(word):
        row = []
        for prompt in (plain, styled):
            p = processing.StableDiffusionProcessingTxt2Img(
                sd_model=shared.sd_model,
                prompt=prompt,
                negative_prompt="",
                seed=0,
                steps=steps,
                width=size,
                height=size,
                cfg_scale=7.0,
                sampler_name="Euler",
                batch_size=1,
                n_iter=1,
                do_not_save_samples=True,
                do_not_save_grid=True,
            )
            try:
                processed = processing.process_images(p)
            finally:
                with contextlib.suppress(Exception):
                    p.close()
            row.append(processed.images[0])
        pairs.append(tuple(row))
    if card is not None:
        card.parent.mkdir(parents=True, exist_ok=True)
        pairs[0][1].convert("RGB").save(card)
    return core.save_preview_grid(pairs, out)


def run(values: dict[str, Any]) -> dict[str, Any]:
    """One run (caller holds the WebUI's queue lock and has begun ``shared.state``)."""
    s = settings(values)
    host = WebuiHost()
    report = core.run(
        s, ledger=ledger_path(), out_dir=embeddings_dir(), host=host, max_epsilon=max_epsilon()
    )
    if s.preview:
        shared.state.textinfo = "preview: generating with and without the embedding"
        # The Extra Networks card shows <name>.preview.png cropped to a portrait: one picture
        # with the embedding (the with/without grid there was cut to "without | with embeddi");
        # the grid, shown in the tab, goes beside the ledger in the WebUI's data folder
        card = Path(report.file).with_name(f"{report.name}.preview.png")
        grid = Path(_data_dir()) / "dpagg" / "previews" / f"{report.name}.grid.png"
        if not (card.exists() and grid.exists()):
            generate_preview(report.prompt_word, s.preview_steps, s.preview_size, grid, card)
        report.preview = str(grid)
    return report.to_dict() | {"html": views.report_html(report)}


def suggest(values: dict[str, Any]) -> dict[str, Any]:
    s = settings(values)
    return core.suggest_clip_norm(s, ledger=ledger_path(), host=WebuiHost())


REHEARSAL_KEYS = ("public_folder", "n", "draws")


def rehearsals_dir() -> Path:
    """Where rehearsals write their (public) files: beside the ledger, never the embeddings
    folder the WebUI loads from."""
    return Path(_data_dir()) / "dpagg" / "rehearsals"


def rehearse(values: dict[str, Any]) -> dict[str, Any]:
    """A rehearsal on PUBLIC images (``core.rehearse``): the settings plus ``public_folder``,
    ``n`` and ``draws``. Nothing is spent or recorded."""
    values = dict(values)
    asked = {k: values.pop(k, None) for k in REHEARSAL_KEYS}
    s = settings(values)
    folder = str(asked["public_folder"] or "")
    access.check_folder(folder, image_roots(), "public rehearsal folder")
    try:
        n = int(float(asked["n"] or 0))
        draws = int(float(asked["draws"] or 2))
    except (TypeError, ValueError):
        raise DpaggError("n and draws: whole numbers (n: the size of your private set)") from None
    out = core.rehearse(
        s,
        ledger=ledger_path(),
        out_dir=rehearsals_dir(),
        host=WebuiHost(),
        public_folder=folder,
        n=n,
        draws=draws,
    )
    return out | {"html": views.rehearsal_html(out)}


def budget(values: dict[str, Any]) -> dict[str, Any]:
    """The ledger's status of an image set (``{"images": DIR}``, a folder under the roots)."""
    from dpagg_core.privacy.ledger import Ledger

    folder = str(values.get("images", ""))
    access.check_folder(folder, image_roots(), "image folder")
    n, dataset_id, warnings = core.scan_images(folder, ledger_path())
    status = Ledger(ledger_path()).status(dataset_id)
    return {"n": n, "dataset_id": dataset_id, "warnings": warnings, **status}


def tab_run(values: dict[str, Any]) -> tuple[str | None, str, str]:
    """The tab's Train and release: (preview image path, plan HTML, result HTML); a refusal
    shows as an escaped error (file names in it are text, never markup)."""
    try:
        out = run(values)
    except DpaggError as exc:
        return None, plan(values)["html"], views.error_html(exc, "<b>Nothing released:</b> ")
    return out.get("preview"), plan(values)["html"], out["html"]


def tab_rehearse(values: dict[str, Any]) -> tuple[str | None, str]:
    """The tab's Rehearse: (grid path or None, the summary HTML or an escaped error)."""
    try:
        out = rehearse(values)
    except DpaggError as exc:
        return None, views.error_html(exc, "<b>No rehearsal:</b> ")
    return out.get("grid"), out["html"]


def tab_suggest(values: dict[str, Any]) -> tuple[float | None, str]:
    """The tab's Suggest C: (C or None on an error, the HTML to show)."""
    try:
        out = suggest(values)
    except DpaggError as exc:
        return None, views.error_html(exc)
    return out["clip_norm"], views.suggest_html(out)


# ----------------------------------------------------------------------------------------------
# Routes
# ----------------------------------------------------------------------------------------------


def _locked(fn, values: dict[str, Any], job: str):
    from modules.call_queue import queue_lock

    with queue_lock:
        shared.state.begin(job=job)
        try:
            return fn(values)
        finally:
            shared.state.end()


def api_access() -> Any:
    """``webui_access.ApiAccess`` of this WebUI: its options and its own reading of the login
    (``--gradio-auth`` and ``--gradio-auth-path``)."""
    creds = None
    with contextlib.suppress(ImportError, AttributeError, OSError):
        from modules import initialize_util

        creds = list(initialize_util.get_gradio_auth_creds())
    return access.ApiAccess.from_cmd_opts(shared.cmd_opts, creds)


def make_guard(rules: Any):
    """The routes' FastAPI dependency: the caller's credentials (or that it is on this machine),
    its site and content type, checked by ``webui_access.decide`` before anything else; then the
    JSON body (an object) of a POST."""
    from fastapi import HTTPException

    async def guard(request: Request) -> dict[str, Any]:
        client = request.client.host if request.client else None
        denial = access.decide(
            rules, client_host=client, headers=request.headers, method=request.method
        )
        if denial is not None:
            raise HTTPException(denial.status, detail=denial.message, headers=denial.headers)
        if request.method != "POST":
            return {}
        raw = await request.body()
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise HTTPException(400, detail=f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HTTPException(400, detail="the body must be a JSON object of settings")
        return body

    return guard


def on_app_started(_demo: Any, app: Any) -> None:
    from fastapi import Depends
    from fastapi.responses import JSONResponse

    for route in getattr(app, "routes", []):  # the API's embedding database (Forge: separate)
        if getattr(route, "path", "") == "/sdapi/v1/refresh-embeddings":
            db = getattr(getattr(route.endpoint, "__self__", None), "embedding_db", None)
            if db is not None and db not in _api_embedding_dbs:
                _api_embedding_dbs.append(db)

    if access is None:  # a broken install: the tab says why; no routes
        return
    rules = api_access()
    prefix = core.API_PREFIX
    if not rules.enabled:
        print(f"[dpagg] the WebUI's API is off: no {prefix} routes (start it with --api)")
        return
    if not rules.credentials:
        print(f"[dpagg] no --api-auth: {prefix} answers callers on this machine only")
    guarded = Depends(make_guard(rules))

    def answer(fn, *args):
        if IMPORT_ERROR:
            return JSONResponse({"error": IMPORT_ERROR}, status_code=503)
        try:
            return fn(*args)
        except Exception as exc:
            status = core.error_status(exc)
            if status == 500:
                raise
            return JSONResponse({"error": str(exc), "type": type(exc).__name__}, status)

    @app.get(f"{prefix}/info")
    def info(_body: dict = guarded) -> Any:
        return answer(
            lambda: {
                "tab": core.TAB_TITLE,
                "ledger": str(ledger_path()),
                "embeddings_dir": str(embeddings_dir()),
                "checkpoints": checkpoint_choices(),
                "loaded_checkpoint": loaded_checkpoint_title(),
                "defaults": core.Settings().__dict__,
            }
        )

    @app.post(f"{prefix}/plan")
    def plan_route(body: dict = guarded) -> Any:
        return answer(plan, body)

    @app.post(f"{prefix}/budget")
    def budget_route(body: dict = guarded) -> Any:
        return answer(budget, body)

    @app.post(f"{prefix}/run")
    def run_route(body: dict = guarded) -> Any:
        return answer(_locked, run, body, "dpagg run")

    @app.post(f"{prefix}/rehearse")
    def rehearse_route(body: dict = guarded) -> Any:
        return answer(_locked, rehearse, body, "dpagg rehearse")

    @app.post(f"{prefix}/suggest-clip-norm")
    def suggest_route(body: dict = guarded) -> Any:
        return answer(_locked, suggest, body, "dpagg suggest-clip-norm")


# ----------------------------------------------------------------------------------------------
# Settings (Settings > dpagg); not settable through /sdapi/v1/options (restrict_api)
# ----------------------------------------------------------------------------------------------


def on_ui_settings() -> None:
    import gradio as gr

    if access is None:
        return

    def option(default: Any, label: str, component: Any, args: dict | None, info: str) -> Any:
        kwargs = {"section": access.SETTINGS_SECTION, "restrict_api": True}
        try:
            made = shared.OptionInfo(default, label, component, args, **kwargs)
        except TypeError:  # an older WebUI without restrict_api
            kwargs.pop("restrict_api")
            made = shared.OptionInfo(default, label, component, args, **kwargs)
        return made.info(info) if hasattr(made, "info") else made

    shared.opts.add_option(
        access.SETTING_ROOTS,
        option(
            "",
            access.SETTING_ROOTS_LABEL,
            gr.Textbox,
            {"lines": 2},
            f"private and public; one per line; empty: <data dir>/{access.DEFAULT_ROOT_NAME}",
        ),
    )
    shared.opts.add_option(
        access.SETTING_MAX_EPSILON,
        option(
            0.0,
            access.SETTING_MAX_EPSILON_LABEL,
            gr.Number,
            None,
            "a request above it is refused before anything is trained or spent",
        ),
    )


# ----------------------------------------------------------------------------------------------
# The tab
# ----------------------------------------------------------------------------------------------

_FIELD_ORDER = (
    "images",
    "checkpoint",
    "name",
    "mode",
    "epsilon",
    "noise_multiplier",
    "delta",
    "sampling",
    "m",
    "q",
    "releases",
    "clip_norm",
    "public_images",
    "quantile",
    "public_style_folder",
    "public_style_k",
    "clip_norm_from_style",
    "budget_epsilon",
    "budget_delta",
    "steps",
    "learning_rate",
    "vectors",
    "initializer",
    "templates",
    "resolution",
    "batch_size",
    "seed",
    "preview",
    "preview_steps",
    "preview_size",
)


_CHOICE_FIELDS = frozenset(
    {"checkpoint", "mode", "sampling", "templates", "preview", "clip_norm_from_style"}
)


def _js_kwargs(component: Any, fn_name: str) -> dict[str, str]:
    """gradio 3 (A1111 1.10) calls the client-side hook ``_js``, gradio 4 (Forge) ``js``."""
    params = inspect.signature(component.click).parameters
    return {"js": fn_name} if "js" in params else {"_js": fn_name}


def on_ui_tabs():
    import gradio as gr

    if IMPORT_ERROR:
        with gr.Blocks(analytics_enabled=False) as tab:
            gr.HTML(f"<div style='color:#d33'>{html.escape(IMPORT_ERROR)}</div>")
        return [(tab, "Private style (DP)", ELEM)]

    d = core.Settings()
    roots = image_roots()
    with contextlib.suppress(OSError):  # the default root, private to its owner
        if roots == access.image_roots("", _data_dir()):
            roots[0].mkdir(mode=0o700, parents=True, exist_ok=True)
    from modules.call_queue import wrap_gradio_gpu_call

    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            with gr.Column(scale=3):
                comps: dict[str, Any] = {}
                comps["images"] = gr.Textbox(
                    label="Private image folder (never leaves this machine)",
                    placeholder=str(roots[0] / "my-style"),
                    info=f"a folder under {', '.join(map(str, roots))} "
                    "(Settings > dpagg lists the folders dpagg may read)",
                    elem_id=f"{ELEM}_images",
                )
                with gr.Row():
                    choices = checkpoint_choices()
                    comps["checkpoint"] = gr.Dropdown(
                        label="Checkpoint (default: the loaded one)",
                        choices=choices,
                        value=loaded_checkpoint_title() if choices else None,
                        elem_id=f"{ELEM}_checkpoint",
                    )
                    comps["name"] = gr.Textbox(
                        label="Embedding name (the prompt word)", value=d.name
                    )
                with gr.Row():
                    comps["mode"] = gr.Radio(
                        label="Privacy target",
                        choices=[core.MODE_EPSILON, core.MODE_NOISE],
                        value=d.mode,
                        elem_id=f"{ELEM}_mode",
                    )
                    shown = core.target_fields(d.mode)  # the target not chosen is hidden
                    comps["epsilon"] = gr.Number(
                        label="epsilon",
                        value=d.epsilon,
                        visible=shown["epsilon"],
                        elem_id=f"{ELEM}_epsilon",
                    )
                    comps["noise_multiplier"] = gr.Number(
                        label="noise multiplier",
                        value=d.noise_multiplier,
                        visible=shown["noise_multiplier"],
                        elem_id=f"{ELEM}_noise_multiplier",
                    )
                    comps["delta"] = gr.Number(label="delta", value=d.delta)
                with gr.Row():
                    comps["sampling"] = gr.Dropdown(
                        label="Sampling", choices=list(options.SAMPLINGS), value=d.sampling
                    )
                    comps["m"] = gr.Number(label="m (wor)", value=d.m, precision=0)
                    comps["q"] = gr.Number(label="q (poisson)", value=d.q)
                    comps["releases"] = gr.Number(label="releases", value=d.releases, precision=0)
                with gr.Row():
                    comps["clip_norm"] = gr.Number(label="Clip norm C (public)", value=d.clip_norm)
                    comps["public_images"] = gr.Textbox(
                        label="PUBLIC folder for the clip-norm suggestion", placeholder="/path"
                    )
                    comps["quantile"] = gr.Number(label="quantile", value=d.quantile)
                    suggest_btn = gr.Button("Suggest C from the public folder")
                with gr.Row():
                    comps["budget_epsilon"] = gr.Number(
                        label=core.BUDGET_LABEL,
                        info=core.BUDGET_INFO,
                        value=0,
                        elem_id=f"{ELEM}_budget_epsilon",
                    )
                    comps["budget_delta"] = gr.Number(label="budget delta (0 = keep)", value=0)
                with gr.Accordion("Public style folder (the recipe for small sets)", open=False):
                    with gr.Row():
                        comps["public_style_folder"] = gr.Textbox(
                            label="PUBLIC style folder (empty: release in the full space)",
                            info=core.STYLE_INFO,
                            placeholder="/path",
                            elem_id=f"{ELEM}_public_style_folder",
                        )
                        comps["public_style_k"] = gr.Number(
                            label="k per vector (0 = choose on the style subfolders)",
                            value=d.public_style_k,
                            precision=0,
                        )
                        comps["clip_norm_from_style"] = gr.Checkbox(
                            label="C from the style folder (off: the C field)",
                            value=d.clip_norm_from_style,
                        )
                with gr.Accordion("Rehearse on public images (spends nothing)", open=False):
                    gr.HTML(views.rehearse_info_html())
                    with gr.Row():
                        rehearse_folder = gr.Textbox(
                            label="PUBLIC rehearsal folder",
                            placeholder="/path",
                            elem_id=f"{ELEM}_rehearse_folder",
                        )
                        rehearse_n = gr.Number(
                            label="n (the size of your private set)", value=10, precision=0
                        )
                        rehearse_draws = gr.Number(
                            label="noise draws per epsilon", value=2, precision=0
                        )
                        rehearse_btn = gr.Button("Rehearse", elem_id=f"{ELEM}_rehearse")
                    rehearse_grid = gr.Image(
                        label="Rehearsal: without | non-private | three epsilons",
                        interactive=False,
                        elem_id=f"{ELEM}_rehearse_grid",
                    )
                    rehearse_html = gr.HTML(elem_id=f"{ELEM}_rehearse_result")
                with gr.Accordion("Per-image textual inversion", open=False):
                    with gr.Row():
                        comps["steps"] = gr.Number(label="TI steps", value=d.steps, precision=0)
                        comps["learning_rate"] = gr.Number(
                            label="learning rate", value=d.learning_rate
                        )
                        comps["vectors"] = gr.Number(
                            label="vectors per token", value=d.vectors, precision=0
                        )
                        comps["initializer"] = gr.Textbox(
                            label="initializer word (public centre)", value=d.initializer
                        )
                    with gr.Row():
                        comps["templates"] = gr.Dropdown(
                            label="templates",
                            choices=list(options.TEMPLATE_KINDS),
                            value=d.templates,
                        )
                        comps["resolution"] = gr.Number(
                            label="resolution (0 = the model's)", value=0, precision=0
                        )
                        comps["batch_size"] = gr.Number(
                            label="batch size", value=d.batch_size, precision=0
                        )
                        comps["seed"] = gr.Number(
                            label="training seed (TI randomness only)", value=0, precision=0
                        )
                with gr.Accordion("Preview grid", open=False):
                    with gr.Row():
                        comps["preview"] = gr.Checkbox(label="with/without preview", value=True)
                        comps["preview_steps"] = gr.Number(
                            label="preview steps", value=d.preview_steps, precision=0
                        )
                        comps["preview_size"] = gr.Number(
                            label="preview size (0 = the model's)", value=0, precision=0
                        )
            with gr.Column(scale=2):
                plan_html = gr.HTML(
                    views.plan_html({"ok": False, "hint": True}), elem_id=f"{ELEM}_plan"
                )
                with gr.Row():
                    run_btn = gr.Button(
                        "Train and release", variant="primary", elem_id=f"{ELEM}_run"
                    )
                    stop_btn = gr.Button("Interrupt", elem_id=f"{ELEM}_interrupt")
                # the WebUI's progress bar is drawn (position: absolute) in the anchor's parent:
                # a "progress-container" row (the WebUI's class, position: relative) keeps it
                # above the progress text instead of over the plan at the top of the column
                with gr.Row(elem_classes="progress-container"):
                    gr.HTML(elem_id=f"{ELEM}_progress")
                preview = gr.Image(
                    label="Preview: without | with the embedding",
                    show_label=False,  # gradio 4 draws it over the grid's own "without" label
                    interactive=False,
                    elem_id=f"{ELEM}_preview",
                )
                result_html = gr.HTML(elem_id=f"{ELEM}_result")
        id_task = gr.Textbox(visible=False, elem_id=f"{ELEM}_id_task")
        inputs = [comps[k] for k in _FIELD_ORDER]

        def values_of(args: tuple) -> dict[str, Any]:
            return dict(zip(_FIELD_ORDER, args, strict=True))

        def refresh_plan(*args: Any) -> str:
            return plan(values_of(args))["html"]

        for key in _FIELD_ORDER:  # debounced: core.PLAN_EVENTS (no scan per keystroke)
            kind = "choice" if key in _CHOICE_FIELDS else "text"
            for event in core.PLAN_EVENTS[kind]:
                if event == "blur" and isinstance(comps[key], gr.Number):
                    continue  # gradio 4's Number has no blur event: javascript/dpagg_webui.js
                listener = getattr(comps[key], event, None)
                if listener is not None:
                    listener(fn=refresh_plan, inputs=inputs, outputs=[plan_html])
        # A number field that is left (blur): dpaggNumberLeft (javascript/dpagg_webui.js) clicks
        # this hidden button, the same in gradio 3 (A1111) and 4 (Forge, whose gr.Number has no
        # blur event, so a typed budget or epsilon was not planned until Enter or the next run)
        replan_btn = gr.Button(visible=False, elem_id=f"{ELEM}_replan")
        replan_btn.click(fn=refresh_plan, inputs=inputs, outputs=[plan_html])

        def show_target(mode: str):
            shown = core.target_fields(mode)
            return gr.update(visible=shown["epsilon"]), gr.update(visible=shown["noise_multiplier"])

        comps["mode"].change(
            fn=show_target,
            inputs=[comps["mode"]],
            outputs=[comps["epsilon"], comps["noise_multiplier"]],
        )

        def do_run(_id_task: str, *args: Any):
            return tab_run(values_of(args))

        run_btn.click(
            fn=wrap_gradio_gpu_call(do_run, extra_outputs=[None, gr.update()]),
            inputs=[id_task, *inputs],
            outputs=[preview, plan_html, result_html],
            **_js_kwargs(run_btn, "dpaggStartRun"),
        ).then(  # a release: refresh the Extra Networks panes so its card shows at once
            fn=None, inputs=[result_html], outputs=[], **_js_kwargs(run_btn, "dpaggAfterRun")
        )

        def do_suggest(_id_task: str, *args: Any):
            clip_norm, text = tab_suggest(values_of(args))
            return (gr.update() if clip_norm is None else clip_norm), text

        suggest_btn.click(
            fn=wrap_gradio_gpu_call(do_suggest, extra_outputs=[gr.update()]),
            inputs=[id_task, *inputs],
            outputs=[comps["clip_norm"], result_html],
            **_js_kwargs(suggest_btn, "dpaggStartRun"),
        ).then(fn=refresh_plan, inputs=inputs, outputs=[plan_html])  # C was set, not typed

        def do_rehearse(_id_task: str, folder: str, n: Any, draws: Any, *args: Any):
            asked = {"public_folder": folder, "n": n, "draws": draws}
            return tab_rehearse(values_of(args) | asked)

        rehearse_btn.click(
            fn=wrap_gradio_gpu_call(do_rehearse, extra_outputs=[gr.update()]),
            inputs=[id_task, rehearse_folder, rehearse_n, rehearse_draws, *inputs],
            outputs=[rehearse_grid, rehearse_html],
            **_js_kwargs(rehearse_btn, "dpaggStartRun"),
        )
        stop_btn.click(fn=lambda: shared.state.interrupt(), inputs=[], outputs=[])
    return [(tab, "Private style (DP)", ELEM)]


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
