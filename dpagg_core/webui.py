"""What the Stable Diffusion WebUI skin does (AUTOMATIC1111 1.10 API, Forge), without the WebUI.

``scripts/dpagg_webui_tab.py`` is a thin layer: it builds the "Private style (DP)" tab and the
``/dpagg/v1/...`` routes, and hands every decision to the functions here. The WebUI itself sits
behind :class:`Host` (progress, Interrupt, moving the WebUI's model off the GPU, reloading its
embedding databases), so CI tests all of this with a fake host and a tiny model.

Three modules, one door: :mod:`dpagg_core.webui_settings` (the settings, their checks and plan,
the folder scan, the host protocol), :mod:`dpagg_core.webui_public` (the PUBLIC folders: style
recipe, clip-norm suggestion, rehearsal) and this one (the live plan view and the run, the
result); every name of the other two is re-exported here, so the tab imports only ``webui``.
They return data (dicts, dataclasses, plain text from :mod:`dpagg_core.budget_report`), never
markup: the tab's HTML lives with the host, in ``scripts/dpagg_webui_html.py``.

Order of a run (:func:`run`), each step before anything is spent:

1. the settings (:func:`settings_from_dict`), the embedding name and the output folder;
2. the private images (``images.load_image_folder``: the CLI's and ComfyUI's decode and dataset
   id, keyed by the ledger's identity key, so the three skins share one budget per image set when
   they share one ledger file: ``DPAGG_LEDGER``);
3. the plan (``accountant``), the budget (an image set's first release needs a deliberate
   ``budget_epsilon``: :func:`needs_budget`) and the ledger's dry run (``Ledger.check``): an
   over-budget request
   is refused before any training, unless the ledger already holds a release of this set with the
   same public request (plan, C, name): that may be an identical re-run, which is free, so the
   ledger decides after training (the identical embeddings are re-used, others refused);
4. the checkpoint (``models.load_pipeline``, inside ``host.model_off_device()``: the WebUI's own
   model is moved off the GPU first, so there is never a second copy of the weights on it) and its
   family against the WebUI's loaded model (an SDXL embedding is useless to an SD1 model);
5. per-image TI (``ti.train_embeddings``) with ``host.progress`` and ``host.cancelled`` polled
   before every step: Interrupt raises :class:`Interrupted`, nothing is spent or written;
   with a public style folder (``public_style_folder``, issue 21 item 3), per-image TI of those
   PUBLIC pictures first (:func:`build_style_recipe`: basis, public-mean centre, C), checked
   like the private folder's before anything loads (:func:`check_public_folder`);
6. ``release.release_embeddings`` (the ledger's reserve -> noise -> complete, then the file,
   never overwriting: a new release gets a new name, as the WebUI caches prompt conditioning by
   text) and
   ``host.reload_embeddings`` so the WebUI's loader picks the file up without a restart.

Privacy: the per-image embeddings and pixels live only in this process's memory during the run
(docs/privacy.md invariant 4); what the tab and the API show is public (plan, n, the keyed
dataset id, budget figures, the released file's record). Everything that sets the noise is a
setting (invariant 2); the seed drives only the TI randomness (invariant 3).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpagg_core.budget_report import budget_status, next_release
from dpagg_core.errors import BudgetExceeded, DpaggError
from dpagg_core.families import full_space_k
from dpagg_core.webui_public import (  # noqa: F401 - re-exported: webui.<name>
    StyleRecipe,
    build_style_recipe,
    check_public_folder,
    check_style_folder,
    rehearsal_epsilon,
    rehearse,
    style_dim,
    style_k,
    suggest_clip_norm,
)
from dpagg_core.webui_settings import (  # noqa: F401 - re-exported: webui.<name>
    _FIELDS,
    API_PREFIX,
    BUDGET_INFO,
    BUDGET_LABEL,
    FAMILY_RESOLUTION,
    MODE_EPSILON,
    MODE_NOISE,
    PLAN_EVENTS,
    PLAN_HINT,
    PREVIEW_PLAIN,
    PREVIEW_PROMPTS,
    STYLE_INFO,
    STYLE_K_DEFAULT,
    TAB_TITLE,
    Host,
    Interrupted,
    Settings,
    _cancel_check,
    _convert,
    _folder_fingerprint,
    _free_memory,
    _opt,
    _refuse_if_cancelled,
    budget_required_message,
    check_epsilon_caps,
    check_family,
    checkpoint_family,
    ledger_path,
    make_plan,
    needs_budget,
    raise_budget_hint,
    recipe_line,
    scan_images,
    settings_from_dict,
    target_fields,
    ti_config,
)

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Plan and budget view
# ----------------------------------------------------------------------------------------------


def plan_view(
    s: Settings,
    *,
    ledger: Path,
    loaded_family: str | None = None,
    max_epsilon: float | None = None,
) -> dict[str, Any]:
    """The live plan and budget of the image set, before anything runs (dry run only).

    ``{"ok", "error", "n", "dataset_id", "plan", "plan_text", "delta_warning", "forecast",
    "budget", "next_release", "exceeds", "maybe_recorded", "needs_budget", "warnings"}`` (data
    only: the tab's HTML of it is ``scripts/dpagg_webui_html.py``); ``forecast`` is
    :func:`dpagg_core.privacy.forecast.forecast` for the tab's full space (public values only),
    ``budget`` holds the ledger's figures
    (``None`` before the first release), ``next_release`` the cost of one more release with this
    plan and the composed spend after it, ``exceeds`` whether the ledger would refuse it. Errors
    (bad settings, empty folder, ...) come back as ``ok: False`` with the message, never raised:
    the tab shows them while the user types. ``max_epsilon``: the WebUI's cap
    (:func:`check_epsilon_caps`).
    """
    out: dict[str, Any] = {"ok": False, "error": None, "exceeds": False, "warnings": []}
    try:
        from dpagg_core.privacy.accountant import delta_warning, plan_summary
        from dpagg_core.privacy.forecast import forecast
        from dpagg_core.privacy.ledger import Ledger

        check_epsilon_caps(s, max_epsilon)
        family = checkpoint_family(s.checkpoint) if s.checkpoint else None
        if s.checkpoint:
            check_family(family, loaded_family)
        n, dataset_id, warnings = scan_images(s.images, ledger)
        out.update(n=n, dataset_id=dataset_id, warnings=warnings)
        plan = make_plan(s, n)
        check_epsilon_caps(s, max_epsilon, plan.epsilon)
        out.update(plan=plan.to_dict(), plan_text=plan_summary(plan))
        out["delta_warning"] = delta_warning(plan.delta, n)
        # without a public style folder every value of every vector is noised; with one, the
        # K coordinates of its basis (k x vectors per encoder; known before it is built)
        model_family = family or loaded_family or "sd1"
        k = style_dim(s, model_family) or full_space_k(model_family, s.vectors)
        outlook = forecast(plan, k)
        out["forecast"] = outlook.to_dict() | {"text": outlook.text()}
        book = Ledger(ledger, raise_hint=raise_budget_hint)
        status = budget_status(book, dataset_id)
        out["budget"] = {"total": status.pop("budget"), **status}
        out["needs_budget"] = needs_budget(s, out["budget"]["total"])
        nxt = next_release(book, dataset_id, plan, _opt(s.budget_epsilon), _opt(s.budget_delta))
        # "will be refused" only when it will: a request the ledger may answer from its record
        # (an identical re-run: same plan, C and name, and then the same model and training
        # settings) is served at no cost, so it is not called a refusal (issue 20 item 10)
        out["maybe_recorded"] = "refused" in nxt and _may_be_identical(book, dataset_id, plan, s)
        out["exceeds"] = "refused" in nxt and not out["maybe_recorded"]
        out["next_release"] = nxt
        out["ok"] = True
    except DpaggError as exc:
        out["error"] = str(exc)
        out["hint"] = not str(s.images).strip()  # nothing chosen yet: a hint, not an error
    return out


# ----------------------------------------------------------------------------------------------
# The host (the WebUI) and the run
# ----------------------------------------------------------------------------------------------


@dataclass
class RunReport:
    """What a run produced: public values only (the released file and its record)."""

    file: str
    name: str
    prompt_word: str
    reused: bool
    record: dict[str, str]
    budget: dict[str, Any]
    plan: dict[str, Any]
    n: int
    dataset_id: str
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    preview: str | None = None
    recipe: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _may_be_identical(book: Any, dataset_id: str, plan: Any, s: Settings) -> bool:
    """Whether the ledger holds a release of this set with the same public request (plan, C,
    centre, name): a re-run of it may train the identical embeddings and is then free, so an
    exhausted budget must not refuse it before training. The ledger decides after training
    (``release_embeddings``: the identical request is re-used, anything else refused)."""
    from dpagg_core.io.names import sanitize_name

    name = sanitize_name(s.name)
    for row in book.list_releases(dataset_id):
        if (
            row.get("name") == name
            and row.get("plan") == plan.to_dict()
            and float(row.get("clip_norm", -1)) == float(s.clip_norm)
        ):
            return True
    return False


def run(
    s: Settings, *, ledger: Path, out_dir: Path, host: Host, max_epsilon: float | None = None
) -> RunReport:
    """Train per-image TI on the private folder and release one DP embedding (module docstring:
    the order, and why nothing is spent before step 6). ``max_epsilon``: the WebUI's cap on the
    plan's epsilon and a new budget (:func:`check_epsilon_caps`), checked before training."""
    import torch

    from dpagg_core.io.images import load_image_folder
    from dpagg_core.io.names import sanitize_name
    from dpagg_core.pipeline import LoadedModelTrainer, train_and_release
    from dpagg_core.privacy.ledger import Ledger
    from dpagg_core.training.diffusers_backend import DiffusersBackend
    from dpagg_core.training.models import load_pipeline
    from dpagg_core.training.ti import Cancelled

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    sanitize_name(s.name)
    check_epsilon_caps(s, max_epsilon)
    if not s.checkpoint:
        raise DpaggError("checkpoint: choose the model to train on (default: the loaded one)")
    from dpagg_core.io.files import output_folder

    out_dir = output_folder(out_dir, "embeddings folder")
    loaded_family = host.loaded_family()
    guessed = checkpoint_family(s.checkpoint)
    check_family(guessed, loaded_family)
    resolution = s.resolution or FAMILY_RESOLUTION.get(guessed or "sd1", 512)
    images = load_image_folder(s.images, resolution, ledger=ledger) if s.images else None
    if images is None:
        raise DpaggError("images: choose the folder of your PRIVATE images")
    plan = make_plan(s, images.count)
    check_epsilon_caps(s, max_epsilon, plan.epsilon)
    book = Ledger(ledger, raise_hint=raise_budget_hint)
    if needs_budget(s, budget_status(book, images.dataset_id)["budget"]):
        raise DpaggError(budget_required_message(plan.epsilon, refused=True))
    try:
        book.check(images.dataset_id, plan, _opt(s.budget_epsilon), _opt(s.budget_delta))
    except BudgetExceeded:
        if not _may_be_identical(book, images.dataset_id, plan, s):
            raise  # over budget and certainly a new request: refused before any training
    ti_config(s, resolution)  # bad TI settings: refused before the model is loaded
    if s.public_style_folder:  # a private picture in it: refused before anything loads
        check_style_folder(s, ledger)
    timings["checks_s"] = time.perf_counter() - t0

    host.progress(0, 1, "loading the checkpoint")
    with host.model_off_device():
        t1 = time.perf_counter()
        model = load_pipeline(s.checkpoint, device=host.device)
        timings["model_load_s"] = time.perf_counter() - t1
        try:
            check_family(model.family, loaded_family)
            backend = DiffusersBackend.from_loaded(model)
            if not s.resolution and backend.default_resolution != resolution:
                resolution = backend.default_resolution  # e.g. SD2 512-base vs 768-v
                images = load_image_folder(s.images, resolution, ledger=ledger)
            config = ti_config(s, resolution)
            total = config.steps * math.ceil(images.count / config.batch_size)

            def progress(done: int, _total: int) -> None:
                host.progress(done, total, f"per-image TI: step {done} of {total}")

            trainer = LoadedModelTrainer(
                backend, config, s.checkpoint, progress, _cancel_check(host), ledger=ledger
            )
            recipe = None
            options: dict[str, Any] = {"clip_norm": s.clip_norm, "centre": s.centre}
            if s.public_style_folder:  # issue 21 item 3: basis, centre and C from PUBLIC images
                t_style = time.perf_counter()
                recipe = build_style_recipe(s, trainer, book, host)
                options = recipe.options()
                timings["public_style_s"] = time.perf_counter() - t_style
            t2 = time.perf_counter()
            try:  # the core pipeline: a recorded identical request is answered untrained
                with torch.inference_mode(False), torch.enable_grad():
                    outcome = train_and_release(
                        trainer,
                        images,
                        plan,
                        ledger=book,
                        name=s.name,
                        out_dir=out_dir,
                        **options,
                        budget_epsilon=_opt(s.budget_epsilon),
                        budget_delta=_opt(s.budget_delta),
                        new_name_per_release=True,
                        before_release=_refuse_if_cancelled(host),
                    )
            except Cancelled as exc:
                raise Interrupted(
                    "interrupted during per-image training: nothing was spent and nothing written"
                ) from exc
            timings["train_and_release_s"] = time.perf_counter() - t2
        finally:
            del model
            backend = None  # noqa: F841 - drop the last reference to our copy of the weights
            _free_memory()
    host.reload_embeddings(outcome.path)
    summary = outcome.summary()
    timings["total_s"] = time.perf_counter() - t0
    return RunReport(
        file=str(outcome.path),
        name=outcome.name,
        prompt_word=outcome.name,
        reused=outcome.reused,
        record=dict(outcome.record),
        budget=summary["budget"],
        plan=plan.to_dict(),
        n=images.count,
        dataset_id=images.dataset_id,
        timings=timings,
        warnings=list(images.warnings),
        recipe=None if recipe is None else recipe.to_dict(),
    )


# ----------------------------------------------------------------------------------------------
# Preview (generated by the WebUI with the RELEASED embedding only: post-processing, free)
# ----------------------------------------------------------------------------------------------


def preview_prompts(word: str) -> list[tuple[str, str]]:
    """(without, with) prompt pairs for the preview grid."""
    return [(p.format(PREVIEW_PLAIN), p.format(word)) for p in PREVIEW_PROMPTS]


def save_preview_grid(pairs: list[tuple[Any, Any]], out: Path) -> Path:
    """Write the with/without grid (PIL images, one row per prompt) to ``out``, each column under
    its label, small cells enlarged so the labels fit (issue 20 item 12;
    ``showcase.preview.labelled_grid``)."""
    from dpagg_core.showcase.preview import PREVIEW_LABELS, labelled_grid

    return labelled_grid([list(pair) for pair in pairs], list(PREVIEW_LABELS), out)


def error_status(exc: BaseException) -> int:
    """HTTP status of an error for the ``/dpagg/v1`` routes: 409 for a refused or interrupted
    request (budget), 400 for bad input, 500 otherwise."""

    if isinstance(exc, (BudgetExceeded, Interrupted)):
        return 409
    if isinstance(exc, DpaggError):
        return 400
    return 500
