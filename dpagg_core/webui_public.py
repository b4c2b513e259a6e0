"""The WebUI tab's PUBLIC folders (split from :mod:`dpagg_core.webui`, which re-exports these
names): the public style folder that builds the recommended recipe (a public basis, the
public-mean centre and C, issue 21 item 3), the clip-norm suggestion from public images, and the
rehearsal on public images (issue 21 item 1). Every folder here is PUBLIC: checked against the
ledger's private pictures (their keyed digests) before anything loads, never registered, never
charged; a rehearsal records nothing (:mod:`dpagg_core.rehearsal`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from dpagg_core.errors import DpaggError
from dpagg_core.families import family_keys
from dpagg_core.paths import resolve_path
from dpagg_core.webui_settings import (
    FAMILY_RESOLUTION,
    MODE_EPSILON,
    STYLE_K_DEFAULT,
    Host,
    Interrupted,
    Settings,
    _cancel_check,
    _free_memory,
    check_family,
    checkpoint_family,
    make_plan,
    raise_budget_hint,
    scan_images,
    ti_config,
)

log = logging.getLogger(__name__)


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
    keys = len(family_keys(family))
    return (s.public_style_k or STYLE_K_DEFAULT) * s.vectors * keys


def _not_the_private_folder(s: Settings, folder: str, what: str) -> None:

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


def suggest_clip_norm(s: Settings, *, ledger: Path, host: Host) -> dict[str, Any]:
    """The clip norm C from PUBLIC images (``s.public_images``): per-image TI with the same
    model and settings as the private run, then the ``s.quantile`` quantile of the embeddings'
    distances to the initializer centre (as ``dpagg suggest-clip-norm``). Refuses the private
    folder itself (tuning C on the private images leaks privacy no record shows)."""
    import torch

    from dpagg_core.io.images import load_image_folder
    from dpagg_core.privacy import mechanism
    from dpagg_core.training.diffusers_backend import DiffusersBackend
    from dpagg_core.training.models import load_pipeline
    from dpagg_core.training.ti import Cancelled, train_embeddings

    if not s.public_images:
        raise DpaggError("public_images: choose a folder of PUBLIC images in a similar style")
    _not_the_private_folder(s, s.public_images, "public folder for the clip norm C")
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
