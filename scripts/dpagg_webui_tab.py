"""dpagg as a Stable Diffusion WebUI extension (AUTOMATIC1111 1.10 API; run in Forge).

A thin skin over ``dpagg_core``: the "Private style (DP)" tab (``script_callbacks.on_ui_tabs``),
its settings (``on_ui_settings``) and the ``/dpagg/v1/...`` routes (``on_app_started``), all
registered here. Every decision lives in ``dpagg_core.webui`` and ``dpagg_core.webui_access``
(tested in CI without a WebUI). This file talks to the WebUI: its command-line options and
settings, its progress state and Interrupt, its memory management, its checkpoint list, its
embedding databases, its txt2img for the preview grid. It holds the actions the tab and the
routes share, the routes, and the registration of the callbacks. Three files beside it, none of
which imports this one, hold the rest (issue 19 item 4): ``dpagg_webui_layout.py`` the Gradio
layout of the tab and of Settings > dpagg (built by a function given this file's handlers to
wire), ``dpagg_webui_html.py`` the tab's HTML, ``dpagg_webui_host.py`` the WebUI behind
``dpagg_core.webui.Host`` (progress, Interrupt, the model off the GPU, the embedding databases).
This file loads each by its path (``_sibling``): the WebUI loads every file of ``scripts/`` as
its own script, by path, and never puts ``scripts/`` on ``sys.path``, so ``import`` would fail.

The routes exist only when the WebUI serves its own API (``--api``) and are guarded as its own
routes are (``--api-auth``, else the WebUI's login; without credentials, callers on this machine
only): ``dpagg_core.webui_access`` says who may call them (docs/privacy.md, invariant 10).

The WebUI imports this file with the extension folder on ``sys.path``, so ``dpagg_core`` resolves
to the extension's copy. If a dependency is missing (``dp-accounting`` before ``install.py`` ran),
the import does not fail: the tab shows the error and the routes answer 503.
"""

from __future__ import annotations

import contextlib
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
    (never on ``sys.path``, so ``import <name>`` would fail): the tab's layout, its HTML and
    the WebUI host (``dpagg_webui_html.py``'s docstring: why, and why a sibling imports no
    ``dpagg_core`` when it is loaded)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


layout = _sibling("dpagg_webui_layout")  # these two import nothing heavy: a broken install
webui_host = _sibling("dpagg_webui_host")  # still shows its error in the tab


try:
    import dpagg_core.privacy.accountant  # noqa: F401 - needs scipy, attrs: fail here, not mid-run
    import dpagg_core.privacy.ledger  # noqa: F401
    from dpagg_core import webui as core
    from dpagg_core import webui_access as access
    from dpagg_core.errors import DpaggError

    views = _sibling("dpagg_webui_html")
    IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - a broken install; shown in the tab
    core = views = None  # type: ignore[assignment]
    access = None  # type: ignore[assignment]
    DpaggError = ValueError  # type: ignore[misc,assignment]
    IMPORT_ERROR = (
        f"dpagg cannot start: {type(exc).__name__}: {exc}. Fix: restart the WebUI so that the "
        "extension's install.py installs the missing packages (or run `pip install -r "
        "requirements.txt` of the extension in the WebUI's Python environment)."
    )
    print(f"[dpagg] {IMPORT_ERROR}")

ELEM = "dpagg"


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
    model = webui_host.loaded_model()
    if model is not None:
        return str(model.sd_checkpoint_info.title)
    return str(getattr(shared.opts, "sd_model_checkpoint", "") or "")


def resolve_checkpoint(value: str) -> str:
    """A checkpoint title of the WebUI's list, a file/folder path, or '' (the loaded model /
    the selected one) -> a path for ``dpagg_core.training.models``."""
    from modules import sd_models

    value = (value or "").strip()
    if not value:
        model = webui_host.loaded_model()
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
            loaded_family=webui_host.WebuiHost().loaded_family(),
            max_epsilon=max_epsilon(),
        )
    return {**view, "html": views.plan_html(view)}


def generate_preview(word: str, steps: int, size: int, out: Path, card: Path | None = None) -> Path:
    """With/without grid rendered by the WebUI's own txt2img (released embedding only), written
    to ``out``; ``card``: also the first picture WITH the embedding, alone (the Extra Networks
    card's thumbnail)."""
    from modules import processing

    model = webui_host.loaded_model() or shared.sd_model
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
    host = webui_host.WebuiHost()
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
    return core.suggest_clip_norm(s, ledger=ledger_path(), host=webui_host.WebuiHost())


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
        host=webui_host.WebuiHost(),
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
        return None, plan(values)["html"], views.refusal_html(exc, values)
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
            if db is not None and db not in webui_host.api_embedding_dbs:
                webui_host.api_embedding_dbs.append(db)

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
# The tab and Settings > dpagg: their layout is dpagg_webui_layout.py, wired to the actions above
# ----------------------------------------------------------------------------------------------


def on_ui_settings() -> None:
    """Settings > dpagg; not settable through /sdapi/v1/options (restrict_api)."""
    if access is None:
        return
    layout.add_settings(shared)


def on_ui_tabs():
    if IMPORT_ERROR:
        return layout.error_tab(IMPORT_ERROR, ELEM)
    roots = image_roots()
    with contextlib.suppress(OSError):  # the default root, private to its owner
        if roots == access.image_roots("", _data_dir()):
            roots[0].mkdir(mode=0o700, parents=True, exist_ok=True)
    checkpoints = checkpoint_choices()
    return layout.build_tab(
        elem=ELEM,
        views=views,
        roots=roots,
        checkpoints=checkpoints,
        loaded_checkpoint=loaded_checkpoint_title() if checkpoints else None,
        plan=plan,
        tab_run=tab_run,
        tab_suggest=tab_suggest,
        tab_rehearse=tab_rehearse,
        interrupt=lambda: shared.state.interrupt(),
    )


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
