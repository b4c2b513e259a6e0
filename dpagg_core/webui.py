"""What the Stable Diffusion WebUI skin does (AUTOMATIC1111 1.10 API, Forge), without the WebUI.

``scripts/dpagg_webui_tab.py`` is a thin layer: it builds the "Private style (DP)" tab and the
``/dpagg/v1/...`` routes, and hands every decision to the functions here. The WebUI itself sits
behind :class:`Host` (progress, Interrupt, moving the WebUI's model off the GPU, reloading its
embedding databases), so CI tests all of this with a fake host and a tiny model.

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

import contextlib
import dataclasses
import gc
import hashlib
import html
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dpagg_core.budget_report import (
    BUDGET_MEANING,
    budget_line,
    budget_status,
    next_release,
)
from dpagg_core.budget_report import budget_required_message as _budget_required
from dpagg_core.budget_report import fmt as _fmt
from dpagg_core.budget_report import needs_budget as _needs_budget
from dpagg_core.errors import DpaggError
from dpagg_core.webui_access import check_epsilon_cap

log = logging.getLogger(__name__)

API_PREFIX = "/dpagg/v1"
TAB_TITLE = "Private style (DP)"
MODE_EPSILON = "epsilon"
MODE_NOISE = "noise_multiplier"
FAMILY_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024}
PREVIEW_PROMPTS = ("a lighthouse, in the style of {}", "a cat, in the style of {}")
PREVIEW_PLAIN = "a painting"
PLAN_HINT = (
    "choose the private image folder (type its path, then Enter or click elsewhere): the plan "
    "and the image set's budget show here before anything runs"
)
BUDGET_LABEL = "budget epsilon: total epsilon this image set may ever spend"
BUDGET_INFO = (
    "required before the image set's first release (a deliberate choice: the ledger refuses "
    "any release beyond it); 0 = keep the budget the ledger recorded"
)
# When the tab recomputes the plan (issue 20 item 11): a text or number field when it is done
# (Enter or leaving the field), never on each keystroke, which scanned every prefix of a path
# being typed; a choice (dropdown, radio, checkbox) at once.
PLAN_EVENTS = {"text": ("blur", "submit"), "choice": ("change",)}
# The public style folder (issue 21 item 3): the README's small-set recipe, a basis of k
# directions per vector from PUBLIC images, the public-mean centre and C from the same data.
STYLE_K_DEFAULT = 16
STYLE_INFO = (
    "optional: PUBLIC images of styles like yours (k = 0: one subfolder per style, k chosen on "
    "them). When set, the release is noised in their basis around their mean embedding, with C "
    "from them: the recipe that works best at small n. Never your private pictures."
)


class Interrupted(DpaggError):
    """The user pressed Interrupt before the release: nothing was spent or written."""


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything the tab / ``POST /dpagg/v1/run`` takes. All of it is public (invariant 2).

    ``checkpoint``: a checkpoint file or diffusers folder ('' = the host resolves the WebUI's
    loaded model). ``m``, ``q``, ``budget_*``, ``resolution`` and ``preview_size``: 0 means
    "not given" (the widgets' convention, as in the ComfyUI nodes).
    """

    images: str = ""
    checkpoint: str = ""
    name: str = "mystyle"
    mode: str = MODE_EPSILON
    epsilon: float = 4.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    sampling: str = "full"
    m: int = 0
    q: float = 0.0
    releases: int = 1
    clip_norm: float = 1.0
    centre: str = "initializer"
    budget_epsilon: float = 0.0
    budget_delta: float = 0.0
    steps: int = 300
    learning_rate: float = 5e-3
    vectors: int = 1
    initializer: str = "painting"
    templates: str = "style"
    resolution: int = 0
    batch_size: int = 8
    seed: int = 0
    preview: bool = True
    preview_steps: int = 20
    preview_size: int = 0
    public_images: str = ""
    quantile: float = 0.9
    public_style_folder: str = ""
    public_style_k: int = STYLE_K_DEFAULT
    clip_norm_from_style: bool = True


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def raise_budget_hint(path: Path, dataset_id: str) -> str:
    """How a WebUI user raises a budget: the WebUI has no ``dpagg`` command on PATH, so the
    exact module call with the WebUI's own Python, from the extension's folder."""
    return (
        f"`{sys.executable} -m dpagg_core.cli ledger set-budget --ledger {path} --dataset "
        f"{dataset_id} --epsilon E --delta D`, run in the extension folder (extensions/dpagg)"
    )


def _convert(name: str, value: Any, kind: type) -> Any:
    if value is None:
        return _FIELDS[name].default
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.strip().lower() in ("1", "true", "yes", "on"):
                    return True
                if value.strip().lower() in ("0", "false", "no", "off", ""):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind is int:
            as_float = float(value)
            if not as_float.is_integer():
                raise ValueError(value)
            return int(as_float)
        if kind is float:
            out = float(value)
            if not math.isfinite(out):
                raise ValueError(value)
            return out
        return str(value).strip()
    except (TypeError, ValueError):
        raise DpaggError(
            f"{name}={value!r} is not a valid {kind.__name__}; fix the {name} field"
        ) from None


def settings_from_dict(values: Mapping[str, Any]) -> Settings:
    """Validated :class:`Settings` from the tab's widgets or an API body (unknown keys refused)."""
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise DpaggError(
            f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}"
        )
    kinds = {"bool": bool, "int": int, "float": float, "str": str}
    out = {k: _convert(k, v, kinds[str(_FIELDS[k].type)]) for k, v in values.items()}
    s = Settings(**out)
    if s.mode not in (MODE_EPSILON, MODE_NOISE):
        raise DpaggError(f"mode={s.mode!r}: use {MODE_EPSILON!r} or {MODE_NOISE!r}")
    if not (s.clip_norm > 0):
        raise DpaggError(
            f"clip_norm={s.clip_norm}: must be positive, chosen from PUBLIC data (use the "
            "'suggest from a public folder' button), never from the private images"
        )
    if s.budget_epsilon < 0 or not 0 <= s.budget_delta < 1:
        raise DpaggError("budget_epsilon / budget_delta: use 0 (keep the recorded budget) or > 0")
    if s.resolution < 0 or s.resolution % 8:
        raise DpaggError(f"resolution={s.resolution}: 0 (the model's) or a multiple of 8")
    if s.preview_steps < 1 or s.preview_size < 0 or s.preview_size % 8:
        raise DpaggError("preview_steps must be >= 1, preview_size 0 or a multiple of 8")
    if not 0 < s.quantile <= 1:
        raise DpaggError(f"quantile={s.quantile}: use a number in (0, 1], e.g. 0.9")
    if s.public_style_k < 0:
        raise DpaggError(
            f"public_style_k={s.public_style_k}: directions per vector (e.g. 16), or 0 to choose "
            "k on the public style subfolders"
        )
    return s


def make_plan(s: Settings, n: int):
    """The privacy plan of ``s`` for ``n`` images: the core's one translation of a front end's
    inputs (``calibration.plan_from_inputs``), with the tab's target mode choosing which of
    epsilon and noise multiplier it reads."""
    from dpagg_core.privacy.calibration import plan_from_inputs

    noise = s.mode == MODE_NOISE
    return plan_from_inputs(
        n=n,
        delta=s.delta,
        epsilon=None if noise else s.epsilon,
        noise_multiplier=s.noise_multiplier if noise else None,
        sampling=s.sampling,
        m=s.m,
        q=s.q,
        releases=s.releases,
    )


def ti_config(s: Settings, resolution: int):
    """The ``ti.TIConfig`` of ``s`` at ``resolution`` pixels (validated)."""
    from dpagg_core.training.ti import TIConfig, validate_config

    config = TIConfig(
        steps=s.steps,
        learning_rate=s.learning_rate,
        vectors=s.vectors,
        initializer=s.initializer,
        templates=s.templates,
        resolution=resolution,
        batch_size=s.batch_size,
        seed=s.seed,
    )
    validate_config(config)
    return config


def _opt(value: float) -> float | None:
    return None if not value else float(value)


def check_epsilon_caps(s: Settings, cap: float | None, plan_epsilon: float | None = None) -> None:
    """Refuse a target epsilon, a plan's epsilon (a noise-multiplier request) or a new budget
    above the WebUI's cap (``dpagg_max_epsilon``; None: no cap), before anything runs."""
    if s.mode == MODE_EPSILON:
        check_epsilon_cap(s.epsilon, cap, "epsilon")
    check_epsilon_cap(plan_epsilon, cap, "this plan's epsilon")
    check_epsilon_cap(_opt(s.budget_epsilon), cap, "budget_epsilon")


def target_fields(mode: str) -> dict[str, bool]:
    """Which of the two privacy-target fields the tab shows for ``mode`` (the other one is not
    used by the plan, so it is hidden rather than left editable)."""
    return {"epsilon": mode != MODE_NOISE, "noise_multiplier": mode == MODE_NOISE}


def needs_budget(s: Settings, recorded: Any) -> bool:
    """``budget_report.needs_budget`` for the tab's settings (issue 20 item 10)."""
    return _needs_budget(recorded, s.budget_epsilon)


def budget_required_message(plan_epsilon: float, *, refused: bool = False) -> str:
    """What the tab says (and a refused run answers) when :func:`needs_budget`."""
    return _budget_required(plan_epsilon, "budget epsilon", refused=refused)


# ----------------------------------------------------------------------------------------------
# Where things live in a WebUI
# ----------------------------------------------------------------------------------------------


def ledger_path(webui_data_dir: str | os.PathLike[str]) -> Path:
    """``DPAGG_LEDGER`` if set (as the CLI and the ComfyUI nodes read it), else
    ``<WebUI data dir>/dpagg/ledger.sqlite`` (``--data-dir``; the WebUI folder by default)."""
    from dpagg_core.paths import host_ledger_path

    return host_ledger_path(webui_data_dir)


def checkpoint_family(path: str | os.PathLike[str]) -> str | None:
    """'sd1' | 'sd2' | 'sdxl' of a ``.safetensors`` checkpoint from its header, by the one family
    detection (``training.checkpoints.checkpoint_family``: no full load); None when it cannot
    tell cheaply (other file types, diffusers folders: the run checks after loading)."""
    from dpagg_core.training.checkpoints import checkpoint_family as family_of_file

    return family_of_file(path)


def check_family(chosen: str | None, loaded: str | None) -> None:
    """Refuse to train for a family the WebUI's loaded model cannot use (before anything runs)."""
    if chosen and loaded and chosen != loaded:
        raise DpaggError(
            f"the checkpoint is {chosen} but the WebUI has an {loaded} model loaded: an {chosen} "
            f"embedding cannot be used by an {loaded} model (the WebUI skips it). Fix: choose an "
            f"{loaded} checkpoint, or load an {chosen} model in the WebUI first. Nothing was spent."
        )


# ----------------------------------------------------------------------------------------------
# The image set (count and id for the live plan view)
# ----------------------------------------------------------------------------------------------

_scan_cache: dict[str, tuple[int, str, tuple[str, ...]]] = {}


def _folder_fingerprint(folder: Path, ledger: Path) -> str:
    h = hashlib.sha256(f"{folder}\0{ledger}".encode())
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        st = entry.stat()
        h.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def scan_images(folder: str, ledger: Path) -> tuple[int, str, list[str]]:
    """(n, dataset id, warnings) of an image folder, through the canonical decode; cached while
    the folder's listing (names, sizes, mtimes) is unchanged, so the live plan view is cheap.
    Bad input raises the CLI's errors (empty folder, unreadable image, ...)."""
    from dpagg_core.io.images import load_image_folder
    from dpagg_core.paths import resolve_path

    if not str(folder).strip():
        raise DpaggError("images: choose the folder of your PRIVATE images")
    path = resolve_path(folder)
    if not path.is_dir():
        raise DpaggError(f"image folder {path} does not exist or is not a folder")
    key = _folder_fingerprint(path, ledger)
    if key not in _scan_cache:
        loaded = load_image_folder(path, 8, ledger=ledger)  # 8 px: only the count and id are kept
        _scan_cache.clear()
        _scan_cache[key] = (loaded.count, loaded.dataset_id, tuple(loaded.warnings))
    n, dataset_id, warnings = _scan_cache[key]
    return n, dataset_id, list(warnings)


# ----------------------------------------------------------------------------------------------
# The public style folder (issue 21 item 3)
# ----------------------------------------------------------------------------------------------


def style_k(s: Settings) -> int | str:
    """The k of ``build_public_basis`` for ``s`` (0 in the field: ``'auto'``)."""
    return "auto" if s.public_style_k == 0 else int(s.public_style_k)


def style_dim(s: Settings, family: str) -> int | None:
    """K of the release with ``s``'s public style folder before its basis is built: k x vectors
    per encoder (SDXL has two; k = 0, chosen later, is forecast at :data:`STYLE_K_DEFAULT`);
    None without a style folder (the full space)."""
    if not s.public_style_folder:
        return None
    keys = 2 if family == "sdxl" else 1
    return (s.public_style_k or STYLE_K_DEFAULT) * s.vectors * keys


def _not_the_private_folder(s: Settings, folder: str, what: str) -> None:
    from dpagg_core.paths import resolve_path

    if s.images and resolve_path(s.images) == resolve_path(folder):
        raise DpaggError(
            f"the {what} is the private folder: it must hold PUBLIC images only, never the "
            "private ones. Fix: choose a folder of public images in a similar style."
        )


def check_public_folder(
    s: Settings, folder: str, ledger: Path, what: str, *, styles: bool = False
) -> int:
    """Refuse a PUBLIC folder (style folder, rehearsal folder) before any model loads or anything
    is spent: the private folder itself, or any picture the ledger knows as private (the keyed
    per-image digests; the private folder's pictures are made known first). ``styles``: one
    subfolder per style (``training.public.public_style_folders``). Returns its count."""
    from dpagg_core.io.images import load_image_folder
    from dpagg_core.paths import resolve_path

    if not str(folder).strip():
        raise DpaggError(f"{what}: choose a folder of PUBLIC images in a similar style")
    _not_the_private_folder(s, folder, what)
    if s.images:
        with contextlib.suppress(DpaggError):  # the private pictures become known to the ledger
            scan_images(s.images, ledger)
    path = resolve_path(folder)
    if styles:
        from dpagg_core.training.public import public_style_folders

        parts = public_style_folders(path)
    else:
        parts = [path]
    return sum(load_image_folder(f, 8, ledger=ledger, public=True).count for f in parts)


def check_style_folder(s: Settings, ledger: Path) -> int:
    """:func:`check_public_folder` for ``s.public_style_folder`` (k = 0: style subfolders)."""
    return check_public_folder(
        s, s.public_style_folder, ledger, "public style folder", styles=s.public_style_k == 0
    )


@dataclass(frozen=True)
class StyleRecipe:
    """What a public style folder gives a release (all of it public): the basis, the public
    embeddings (the centre ``public_mean``) and the clip norm with where it came from."""

    basis: Any
    public: Any
    clip_norm: float
    clip_norm_source: str

    def options(self) -> dict[str, Any]:
        """``release_embeddings`` / ``rehearsal.rehearse`` keywords."""
        return {
            "basis": self.basis,
            "centre": "public_mean",
            "public_centre": self.public,
            "clip_norm": self.clip_norm,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "basis_kind": self.basis.kind,
            "k": int(self.basis.k),
            "K": int(self.basis.dim),
            "public_images": int(self.public.n),
            "centre": "public_mean",
            "clip_norm": float(self.clip_norm),
            "clip_norm_source": self.clip_norm_source,
        }


def build_style_recipe(s: Settings, trainer: Any, book: Any, host: Host) -> StyleRecipe:
    """The public style folder's basis, public-mean centre and C (``training.public.
    build_public_basis``, the CLI's ``dpagg public-basis``) on ``trainer``'s loaded model: C
    is the public images' suggestion around their mean unless ``clip_norm_from_style`` is off
    (then the C field). Interrupt raises :class:`Interrupted` (nothing spent or written)."""
    import torch

    from dpagg_core.paths import resolve_path
    from dpagg_core.training.public import build_public_basis

    def progress(done: int, total: int) -> None:
        host.progress(done, total, f"TI on the PUBLIC style folder: step {done} of {total}")

    host.progress(0, 1, "per-image TI of the PUBLIC style folder")
    with torch.inference_mode(False), torch.enable_grad():
        built = build_public_basis(
            trainer, resolve_path(s.public_style_folder), style_k(s), ledger=book, progress=progress
        )
    if host.cancelled():
        raise Interrupted("interrupted: nothing was spent and nothing written")
    if s.clip_norm_from_style:
        clip_norm, source = float(built.clip_norms["public_mean"]), "public style folder"
    else:
        clip_norm, source = float(s.clip_norm), "set by the user"
    return StyleRecipe(built.basis, built.public, clip_norm, source)


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
    "budget", "next_release", "exceeds", "warnings", "html"}``; ``forecast`` is
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
        from dpagg_core.families import full_space_k
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
    out["html"] = plan_html(out)
    return out


def _budget_line(budget: dict[str, Any]) -> str:
    total, spent = budget.get("total"), budget["spent"]
    return budget_line(
        (spent["epsilon"], spent["delta"]),
        None if total is None else (total["epsilon"], total["delta"]),
        budget["releases"],
        budget["composition"],
    )


def error_html(message: Any, lead: str = "") -> str:
    """An error for the tab, escaped (a file name such as ``<img src=x onerror=...>.jpg`` in a
    decode error must show as text, never become markup); ``lead`` is trusted markup."""
    text = html.escape(str(message))
    return f"<div class='dpagg-error' style='color:#d33'>{lead}{text}</div>"


def plan_html(view: Mapping[str, Any]) -> str:
    """The plan view as HTML for the tab (red when the next release would be refused)."""
    esc = html.escape
    if not view.get("ok") and view.get("hint"):
        return f"<div class='dpagg-plan'>{esc(PLAN_HINT)}</div>"
    if not view.get("ok"):
        return error_html(view.get("error"))
    plan = view["plan"]
    lines = [
        f"<b>{view['n']} private images</b>, image set <code>{esc(view['dataset_id'])}</code>",
        f"plan: epsilon {_fmt(plan['epsilon'])}, delta {plan['delta']:.3g}, noise multiplier "
        f"{_fmt(plan['noise_multiplier'])}, sampling {esc(plan['sampling'])} "
        f"({esc(plan['accountant'])})",
        esc(_budget_line(view["budget"])),
    ]
    if view.get("forecast"):
        lines.append(f"<span class='dpagg-forecast'>{esc(view['forecast']['text'])}</span>")
    nxt = view["next_release"]
    cost = f"next release costs epsilon {_fmt(nxt['epsilon'])}, delta {nxt['delta']:.3g}"
    if view.get("needs_budget"):
        lines.append(
            "<span class='dpagg-needs-budget' style='color:#d33;font-weight:bold'>"
            f"{esc(budget_required_message(nxt['epsilon']))}"
            "</span>"
        )
    elif view["budget"].get("total") is None and nxt.get("budget"):
        lines.append(
            esc(
                f"this first release sets the budget to epsilon {_fmt(nxt['budget']['epsilon'])}"
                f", delta {nxt['budget']['delta']:.3g}: {BUDGET_MEANING}"
            )
        )
    if view["exceeds"]:
        lines.append(
            f"<span style='color:#d33;font-weight:bold'>{esc(cost)}: it would EXCEED the budget "
            "and will be refused (nothing is spent)</span>"
        )
    elif view.get("maybe_recorded"):
        lines.append(
            "<span class='dpagg-recorded' style='color:#c80'>"
            + esc(
                "an earlier release of this image set has the same plan, clip norm and name: "
                "with the same checkpoint and training settings (steps, seed, ...) this is an "
                "identical re-run, answered from the ledger's record at no cost; any other "
                f"release ({cost}) would exceed the budget and is refused before training"
            )
            + "</span>"
        )
    else:
        after = nxt.get("spent_after") or {}
        if after:
            cost += f" (spent after: epsilon {_fmt(after['epsilon'])})"
        lines.append(esc(cost))
    if view.get("delta_warning"):
        lines.append(f"<span style='color:#d33'>{esc(view['delta_warning'])}</span>")
    lines += [f"<span style='color:#c80'>warning: {esc(w)}</span>" for w in view["warnings"]]
    klass = "dpagg-plan dpagg-exceeds" if view["exceeds"] else "dpagg-plan"
    return f"<div class='{klass}'>" + "<br>".join(lines) + "</div>"


# ----------------------------------------------------------------------------------------------
# The host (the WebUI) and the run
# ----------------------------------------------------------------------------------------------


class Host(Protocol):
    """What a run needs from the WebUI (``scripts/dpagg_webui_tab.py``; fakes in the tests)."""

    device: str

    def progress(self, done: int, total: int, text: str) -> None:
        """Show progress in the WebUI's own progress UI (it computes the ETA)."""

    def cancelled(self) -> bool:
        """True once the user pressed Interrupt."""

    def model_off_device(self) -> contextlib.AbstractContextManager[Any]:
        """Move the WebUI's model off the GPU (its own memory management) for the block and
        make it usable again after; a no-op on CPU."""

    def reload_embeddings(self, path: Path) -> None:
        """Make the WebUI's embedding databases load the new file (no restart)."""

    def loaded_family(self) -> str | None:
        """'sd1' | 'sd2' | 'sdxl' of the WebUI's loaded model, or None if unknown."""


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

    def html(self) -> str:
        esc = html.escape
        head = (
            "re-used the identical earlier release (nothing spent)"
            if self.reused
            else "released a new differentially private embedding"
        )
        b = self.budget
        budget = budget_line(
            (b["spent_epsilon"], b["spent_delta"]),
            (b["epsilon"], b["delta"]),
            None,
            b["composition"],
        )
        rows = "".join(
            f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>"
            for k, v in sorted(self.record.items())
        )
        return (
            f"<div class='dpagg-report'><b>{esc(head)}</b>: <code>{esc(self.file)}</code><br>"
            f"use it in a prompt as: <code>{esc(self.prompt_word)}</code> "
            f"(e.g. <i>a lighthouse, in the style of {esc(self.prompt_word)}</i>)<br>"
            f"{esc(budget)}<br>"
            + (f"{esc(_recipe_line(self.recipe))}<br>" if self.recipe else "")
            + "privacy record (stored in the file header):"
            f"<table class='dpagg-record'>{rows}</table></div>"
        )


def _recipe_line(recipe: Mapping[str, Any] | None) -> str:
    if not recipe:
        return ""
    return (
        f"recipe: public {recipe['basis_kind']} basis, k {recipe['k']} (K {recipe['K']}), centre "
        f"{recipe['centre']}, C {recipe['clip_norm']:.4g} ({recipe['clip_norm_source']}), from "
        f"{recipe['public_images']} PUBLIC images"
    )


def _free_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _cancel_check(host: Host) -> Callable[[], bool]:
    def should_cancel() -> bool:
        return bool(host.cancelled())

    return should_cancel


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

    from dpagg_core.errors import BudgetExceeded
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


def _refuse_if_cancelled(host: Host) -> Callable[[], None]:
    def check() -> None:
        if host.cancelled():
            raise Interrupted(
                "interrupted before the release: nothing was spent and nothing written"
            )

    return check


def suggest_clip_norm(s: Settings, *, ledger: Path, host: Host) -> dict[str, Any]:
    """The clip norm C from PUBLIC images (``s.public_images``): per-image TI with the same
    model and settings as the private run, then the ``s.quantile`` quantile of the embeddings'
    distances to the initializer centre (as ``dpagg suggest-clip-norm``). Refuses the private
    folder itself (tuning C on the private images leaks privacy no record shows)."""
    import torch

    from dpagg_core.io.images import load_image_folder
    from dpagg_core.paths import resolve_path
    from dpagg_core.privacy import mechanism
    from dpagg_core.training.diffusers_backend import DiffusersBackend
    from dpagg_core.training.models import load_pipeline
    from dpagg_core.training.ti import Cancelled, train_embeddings

    if not s.public_images:
        raise DpaggError("public_images: choose a folder of PUBLIC images in a similar style")
    if s.images and resolve_path(s.images) == resolve_path(s.public_images):
        raise DpaggError(
            "the public folder is the private folder: C must come from PUBLIC images, never "
            "from the private ones. Fix: choose a folder of public images in a similar style."
        )
    if not s.checkpoint:
        raise DpaggError("checkpoint: choose the model to train on (default: the loaded one)")
    guessed = checkpoint_family(s.checkpoint)
    resolution = s.resolution or FAMILY_RESOLUTION.get(guessed or "sd1", 512)
    if s.images:
        # The private folder's pictures become known to the ledger (an unreadable private folder
        # is reported by the plan, not here); the public load below then refuses any of them.
        with contextlib.suppress(DpaggError):
            scan_images(s.images, ledger)
    public = load_image_folder(s.public_images, resolution, ledger=ledger, public=True)
    with host.model_off_device():
        model = load_pipeline(s.checkpoint, device=host.device)
        try:
            backend = DiffusersBackend.from_loaded(model)
            config = ti_config(s, resolution)
            total = config.steps * math.ceil(public.count / config.batch_size)

            def progress(done: int, _total: int) -> None:
                host.progress(done, total, f"TI on PUBLIC images: step {done} of {total}")

            try:
                with torch.inference_mode(False), torch.enable_grad():
                    eset = train_embeddings(
                        backend,
                        public.pixels,
                        config,
                        progress=progress,
                        should_cancel=_cancel_check(host),
                    )
            except Cancelled as exc:
                raise Interrupted("interrupted: no clip norm suggested") from exc
        finally:
            del model
            backend = None  # noqa: F841
            _free_memory()
    return mechanism.suggest_clip_norm(eset, s.quantile)


# ----------------------------------------------------------------------------------------------
# Rehearsal on PUBLIC images (issue 21 item 1): nothing spent or recorded
# ----------------------------------------------------------------------------------------------


def rehearsal_epsilon(s: Settings, n: int) -> float:
    """The epsilon a rehearsal of ``s`` centres on: the target, or in noise-multiplier mode the
    plan's epsilon for ``n`` images."""
    return float(s.epsilon) if s.mode == MODE_EPSILON else float(make_plan(s, n).epsilon)


def rehearse(
    s: Settings,
    *,
    ledger: Path,
    out_dir: Path,
    host: Host,
    public_folder: str,
    n: int,
    draws: int = 2,
) -> dict[str, Any]:
    """The tab's release on ``n`` PUBLIC images of ``public_folder`` (``rehearsal.rehearse``,
    as ``dpagg rehearse``): the same checkpoint, TI settings, plan rules, C, centre and (with a
    public style folder) basis as :func:`run`, at half, the chosen and double epsilon, ``draws``
    fresh noise draws each. Nothing is spent or recorded (no ledger release; the pictures are
    loaded as public: a folder holding a picture the ledger knows as private is refused before
    any model loads). The files go to ``out_dir`` (never the embeddings folder). With
    ``s.preview`` the grid (without | non-private | three epsilons) is rendered on dpagg's own
    copy of the checkpoint (``showcase.preview.grid_of_embeddings``), not the WebUI's txt2img.
    Returns the summary, its ``text``, the ``recipe`` (or None) and ``grid`` (a path or None)."""
    import torch

    from dpagg_core.io.files import output_folder
    from dpagg_core.io.names import sanitize_name
    from dpagg_core.pipeline import LoadedModelTrainer
    from dpagg_core.privacy.ledger import Ledger
    from dpagg_core.rehearsal import pick_public
    from dpagg_core.rehearsal import rehearse as rehearse_public
    from dpagg_core.training.diffusers_backend import DiffusersBackend
    from dpagg_core.training.models import load_pipeline
    from dpagg_core.training.ti import Cancelled

    name = sanitize_name(s.name)
    if not s.checkpoint:
        raise DpaggError("checkpoint: choose the model to train on (default: the loaded one)")
    if draws < 1:
        raise DpaggError(f"draws={draws}: at least one noise draw per epsilon")
    epsilon = rehearsal_epsilon(s, max(int(n), 2))

    def plan_for(eps: float, count: int):
        return make_plan(dataclasses.replace(s, mode=MODE_EPSILON, epsilon=eps), count)

    pick_public(check_public_folder(s, public_folder, ledger, "public rehearsal folder"), n, s.seed)
    plan_for(epsilon, n)  # the plan's errors before anything loads
    if s.public_style_folder:
        check_style_folder(s, ledger)
    guessed = checkpoint_family(s.checkpoint)
    check_family(guessed, host.loaded_family())
    resolution = s.resolution or FAMILY_RESOLUTION.get(guessed or "sd1", 512)
    ti_config(s, resolution)
    out_dir = output_folder(out_dir, "rehearsal folder")
    book = Ledger(ledger, raise_hint=raise_budget_hint)
    host.progress(0, 1, "loading the checkpoint")
    with host.model_off_device():
        model = load_pipeline(s.checkpoint, device=host.device)
        try:
            check_family(model.family, host.loaded_family())
            backend = DiffusersBackend.from_loaded(model)
            if not s.resolution:
                resolution = backend.default_resolution
            config = ti_config(s, resolution)

            def progress(done: int, total: int) -> None:
                host.progress(done, total, f"TI on PUBLIC images: step {done} of {total}")

            trainer = LoadedModelTrainer(
                backend, config, s.checkpoint, progress, _cancel_check(host), ledger=ledger
            )
            recipe = build_style_recipe(s, trainer, book, host) if s.public_style_folder else None
            options = recipe.options() if recipe else {"clip_norm": s.clip_norm, "centre": s.centre}
            render = None
            if s.preview:
                from functools import partial

                from dpagg_core.showcase.preview import grid_of_embeddings

                render = partial(
                    grid_of_embeddings, model, steps=s.preview_steps, size=s.preview_size or None
                )
            try:
                with torch.inference_mode(False), torch.enable_grad():
                    result = rehearse_public(
                        trainer,
                        public_folder,
                        n=n,
                        plan_for=plan_for,
                        epsilon=epsilon,
                        out_dir=out_dir,
                        name=f"{name}-rehearsal",
                        draws=draws,
                        seed=s.seed,
                        render=render,
                        ledger=book,
                        **options,
                    )
            except Cancelled as exc:
                raise Interrupted("interrupted: nothing was spent and nothing written") from exc
        finally:
            del model
            backend = None  # noqa: F841
            _free_memory()
    out = result.summary()
    out["text"] = result.text()
    out["recipe"] = None if recipe is None else recipe.to_dict()
    return out


def rehearsal_html(out: Mapping[str, Any]) -> str:
    """A rehearsal's summary for the tab (escaped text; the grid is shown beside it)."""
    lines = out["text"].splitlines()
    if out.get("recipe"):
        lines.insert(1, _recipe_line(out["recipe"]))
    body = "<br>".join(html.escape(line) for line in lines)
    return f"<div class='dpagg-rehearsal'>{body}</div>"


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
    from dpagg_core.errors import BudgetExceeded

    if isinstance(exc, (BudgetExceeded, Interrupted)):
        return 409
    if isinstance(exc, DpaggError):
        return 400
    return 500
