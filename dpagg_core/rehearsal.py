"""Rehearsal: the release pipeline on PUBLIC images, to see what n, epsilon and a recipe give
before any private picture is touched (issue 21 item 1). Nothing is spent or recorded.

A rehearsal takes a folder of PUBLIC images of a style like the user's, draws ``n`` of them
(the user's private set size; a public seed), trains per-image textual inversion with the same
model and settings a release would use, and then releases, with fresh noise each time, ``draws``
DP means at three epsilons (half, the chosen one, double) with the same plan rules, clip norm,
centre, basis and post-processing as :func:`dpagg_core.aggregate.release.release_embeddings`.
Beside them: the non-private mean (the ceiling) and the model without any embedding (the
floor), rendered side by side (``showcase.preview``), and the forecast
(:mod:`dpagg_core.privacy.forecast`) with the agreement rho measured on these public embeddings.

Privacy: every input is public. The folder is loaded with ``public=True``
(:func:`dpagg_core.io.images.load_image_folder`): a picture the ledger knows as private is
refused (its keyed digest), and nothing is registered. The mechanism is called directly, not
through the ledger, which is right only because the data is public; the written files say so in
their record (``rehearsal: public images``) and go to their own folder, never the embeddings
folder a release writes to. Caveat: the per-image digests catch copies of recorded private
files, not a different photo of the same private artwork (docs/privacy.md invariant 8).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpagg_core.aggregate.postprocess import apply as postprocess_apply
from dpagg_core.aggregate.release import (
    centre_vector,
    default_centre,
    draw_mean,
    postprocess_targets,
)
from dpagg_core.errors import DpaggError
from dpagg_core.io.names import next_free_name, sanitize_name
from dpagg_core.io.released_file import write_released
from dpagg_core.privacy.forecast import Forecast, agreement, forecast

REHEARSAL_RECORD = "public images only: a rehearsal, not a release of private data"


def rehearsal_epsilons(epsilon: float) -> tuple[float, float, float]:
    """The three epsilons a rehearsal shows: half, the chosen one, double."""
    return (epsilon / 2, epsilon, epsilon * 2)


@dataclass
class Rehearsal:
    """What a rehearsal measured. ``error[eps]``: per draw, the distance of the private release
    from the non-private mean over the mean's own distance from the centre (0 = the ceiling;
    about 1 or more = the style is lost in the noise)."""

    n: int
    available: int
    plans: dict[float, Any]
    forecast: Forecast
    mean_file: Path
    files: dict[float, list[Path]]
    error: dict[float, list[float]]
    grid: Path | None = None
    folder: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "available": self.available,
            "folder": str(self.folder),
            "grid": None if self.grid is None else str(self.grid),
            "mean_file": str(self.mean_file),
            "forecast": self.forecast.to_dict() | {"text": self.forecast.text()},
            "releases": [
                {
                    "epsilon": float(self.plans[e].epsilon),
                    "noise_multiplier": float(self.plans[e].noise_multiplier),
                    "files": [str(p) for p in self.files[e]],
                    "relative_error": self.error[e],
                }
                for e in self.plans
            ],
            "spent": "nothing (public images)",
        }

    def text(self) -> str:
        lines = [
            f"rehearsal on {self.n} PUBLIC images (of {self.available} in the folder); nothing "
            "was spent or recorded",
            self.forecast.text(),
            "distance of each private release from the non-private mean (relative to the mean's "
            "own offset from the centre; 0 = as good as non-private, >= 1 = mostly noise):",
        ]
        for e in self.plans:
            errs = self.error[e]
            lines.append(
                f"  epsilon {self.plans[e].epsilon:.3g}: {np.mean(errs):.2f} "
                f"(draws: {', '.join(f'{x:.2f}' for x in errs)})"
            )
        lines.append(f"files: {self.folder}")
        if self.grid is not None:
            lines.append(f"grid: {self.grid}")
        return "\n".join(lines)


def pick_public(count: int, n: int, seed: int) -> list[int]:
    """``n`` of ``count`` indices, drawn with a public seed (sorted)."""
    if n < 2:
        raise DpaggError(f"n={n}: a rehearsal needs at least 2 images (the size of your set)")
    if n > count:
        raise DpaggError(
            f"n={n} but the public folder holds {count} images: add public images of the style "
            f"(at least {n}) or rehearse a smaller n"
        )
    return sorted(random.Random(seed).sample(range(count), n))


def rehearse(
    trainer: Any,
    public_folder: str | Path,
    *,
    n: int,
    plan_for: Any,
    epsilon: float,
    seed: int = 0,
    **options: Any,
) -> Rehearsal:
    """Rehearse a release on ``n`` PUBLIC images of ``public_folder`` (module docstring).

    ``trainer``: a training driver with ``images(folder, public=True)`` and ``train(loaded)``
    (``training.train_run.Trainer``). ``plan_for(epsilon, n)``: the front end's plan rules at
    another epsilon (``calibration.plan_from_inputs`` with its delta and sampling). ``seed``:
    which ``n`` pictures are drawn (public). ``options``: :func:`rehearse_set`'s (``clip_norm``,
    ``out_dir``, centre, basis, post-processing, ``draws``, ``render(files, labels, out)`` for
    the grid, and ``ledger``, whose private pictures are refused), checked before training."""
    if options.get("draws", 2) < 1:
        raise DpaggError(f"draws={options['draws']}: at least one noise draw per epsilon")
    postprocess_targets(options.get("postprocess", "none"), options.get("basis"))
    plans = {e: plan_for(e, n) for e in rehearsal_epsilons(float(epsilon))}
    loaded = trainer.images(Path(public_folder), public=True)
    chosen = pick_public(loaded.count, n, seed)
    eset = trainer.train(_subset(loaded, chosen))
    return rehearse_set(eset, plans=plans, epsilon=epsilon, available=loaded.count, **options)


def rehearse_set(
    eset: Any,
    *,
    plans: dict[float, Any],
    epsilon: float,
    clip_norm: float,
    out_dir: str | Path,
    name: str = "rehearsal",
    centre: str | None = None,
    public_centre: Any = None,
    basis: Any = None,
    mode: str = "clip",
    postprocess: str = "none",
    draws: int = 2,
    render: Any = None,
    ledger: Any = None,
    available: int | None = None,
    rho: float | None = None,
    rho_source: str = "measured on this public folder",
) -> Rehearsal:
    """The releases of a rehearsal from per-image embeddings of PUBLIC pictures already trained
    (:func:`rehearse`'s second half; ComfyUI's Rehearse node trains them through Per-Image TI):
    ``plans[e]`` per epsilon (:func:`rehearsal_epsilons`), ``draws`` fresh noise draws each,
    files in a new folder under ``out_dir``. ``rho``: the forecast's agreement (None: measured on
    ``eset``, as one style). Never give it private embeddings: nothing here asks the ledger."""
    if draws < 1:
        raise DpaggError(f"draws={draws}: at least one noise draw per epsilon")
    n = int(eset.n)
    target_norms = postprocess_targets(postprocess, basis)
    folder = Path(out_dir) / next_free_name(Path(out_dir), sanitize_name(name))
    centre = centre or default_centre(eset)
    centre_vec = centre_vector(eset, centre, public_centre, ledger=ledger)
    flat = eset.flat().astype(np.float64)
    base = np.zeros(flat.shape[1]) if centre_vec is None else np.asarray(centre_vec, np.float64)
    mean = flat.mean(0)
    offset = float(np.linalg.norm(mean - base)) or 1.0
    layout = [(k, eset.num_vectors, w) for k, w in eset.encoder_widths.items()]
    deltas = flat - base
    coords = basis.project(deltas) if basis is not None else deltas
    k = int(basis.dim) if basis is not None else int(flat.shape[1])
    if rho is None:
        rho = agreement([coords], clip_norm)
    outlook = forecast(plans[float(epsilon)], k, max(rho, 1e-6), rho_source=rho_source)
    record = {"rehearsal": REHEARSAL_RECORD, "n": str(n), "centre": centre}
    folder.mkdir(parents=True, exist_ok=True)
    mean_file = write_released(folder, "nonprivate_mean", eset.unflat(mean), record)
    files: dict[float, list[Path]] = {}
    error: dict[float, list[float]] = {}
    for e, plan in plans.items():
        files[e], error[e] = [], []
        for d in range(draws):
            draw = draw_mean(
                flat,
                plan=plan,
                clip_norm=clip_norm,
                center=centre_vec,
                mode=mode,
                base_model_id=eset.base_model_id,
                centre_kind=centre,
                basis=basis,
            )
            vec, extra = postprocess_apply(
                draw.vector,
                method=postprocess,
                record=draw.record,
                layout=layout,
                centre=centre_vec,
                target_norms=target_norms,
            )
            error[e].append(float(np.linalg.norm(vec - mean)) / offset)
            tag = f"eps{plan.epsilon:.3g}_draw{d + 1}".replace(".", "p")
            meta = {**draw.record, **extra, **record}
            files[e].append(write_released(folder, tag, eset.unflat(vec), meta))
    result = Rehearsal(
        n=n,
        available=n if available is None else int(available),
        plans=plans,
        forecast=outlook,
        mean_file=mean_file,
        files=files,
        error=error,
        folder=folder,
    )
    if render is not None:
        columns = [None, mean_file] + [files[e][0] for e in plans]
        labels = ["without", "non-private"] + [f"eps {plans[e].epsilon:.3g}" for e in plans]
        rows = [columns]
        rows += [[None, mean_file] + [files[e][d] for e in plans] for d in range(1, draws)]
        result.grid = render(rows, labels, folder / "grid.png")
    return result


def _subset(loaded: Any, rows: list[int]) -> Any:
    """The public images ``rows`` of ``loaded`` (same decode, same order)."""

    def pick(values: list) -> list:
        return [values[i] for i in rows] if values else []

    return dataclasses.replace(
        loaded,
        pixels=loaded.pixels[rows],
        count=len(rows),
        digests=pick(loaded.digests),
        looks=pick(loaded.looks),
    )
