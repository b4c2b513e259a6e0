"""The WebUI tab's settings and the helpers every part of the tab shares (split from
:mod:`dpagg_core.webui`, which re-exports them): the settings a user types (all PUBLIC,
invariant 2) and their conversion and checks, the plan they ask for, where things live in a
WebUI, the live scan of the private folder (its count and keyed id), and the host protocol
(progress, cancel, the WebUI's model off the device). Used by :mod:`dpagg_core.webui` (plan view,
run) and :mod:`dpagg_core.webui_public` (public folders, rehearsal).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dpagg_core.budget_report import budget_required_message as _budget_required
from dpagg_core.budget_report import needs_budget as _needs_budget
from dpagg_core.errors import DpaggError
from dpagg_core.paths import host_ledger_path, resolve_path
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


class Host(Protocol):
    """What a run needs from the WebUI (``scripts/dpagg_webui_host.py``; fakes in the tests)."""

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


def recipe_line(recipe: Mapping[str, Any] | None) -> str:
    """The public style recipe (``webui_public.StyleRecipe.to_dict``) in one line of text."""
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


def _refuse_if_cancelled(host: Host) -> Callable[[], None]:
    def check() -> None:
        if host.cancelled():
            raise Interrupted(
                "interrupted before the release: nothing was spent and nothing written"
            )

    return check
