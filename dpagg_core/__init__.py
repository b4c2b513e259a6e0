"""dpagg core: differentially private aggregation of per-image embeddings (DPAgg-TI).

Never imports ComfyUI; the node pack in ``nodes/`` is a thin skin over this package.

The public Python API is the five steps of a release, importable from here (each is loaded on
first use, so ``import dpagg_core`` stays light and imports neither torch nor numpy). The README's
"Python" section shows them together (``tests/test_python_api.py`` runs that snippet)::

    import dpagg_core as dpagg

    images = dpagg.load_image_folder("private/mystyle")  # the ledger learns the set
    eset = dpagg.train("models/sd15", images, dpagg.TIConfig(steps=500))  # per-image TI
    plan = dpagg.calibrate(1.0, delta=1e-5, n=images.count)  # the noise for epsilon 1
    out = dpagg.release_embeddings(eset, plan=plan, clip_norm=0.5, name="mystyle",
                                   out_dir="embeddings", ledger=dpagg.Ledger())

* :func:`load_image_folder` (``dpagg_core.io.images``): a folder of private pictures -> a
  ``LoadedImages`` (pixels, count, dataset id keyed by the ledger);
* :class:`TIConfig` (``dpagg_core.training.ti``): the public textual-inversion settings;
* :func:`train`: per-image textual inversion on a Stable Diffusion model -> a private
  ``EmbeddingSet`` (in memory; never write it next to released files);
  :class:`Trainer` (``dpagg_core.training.train_run``) keeps the model loaded across calls;
* :func:`calibrate` / :func:`epsilon_for` (``dpagg_core.privacy.calibration`` / ``bounds``):
  a ``PrivacyPlan`` for a target epsilon, or the epsilon of a given noise;
* :func:`release_embeddings` (``dpagg_core.aggregate.release``): the one DP release, charged to the
  ledger before the noise leaves it, written as ``<out_dir>/<name>.safetensors``;
* :class:`Ledger` (``dpagg_core.privacy.ledger``): budgets and every release (default file:
  ``DPAGG_LEDGER``, else the user data dir); ``status(dataset_id)``, ``set_budget(...)``;
* :class:`DpaggError`: every refusal, with the fix in its message.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"


def _add_pack_deps() -> None:
    """Make dp-accounting importable when the pack's ``install.py`` put it in ``<pack>/_deps``.

    dp-accounting pins attrs<24 in every release, so ``install.py`` does not install it into the
    host's environment (ComfyUI and the WebUI have a newer attrs, and ``pip check`` would
    complain): it installs it with ``--no-deps --target <pack>/_deps``, a git-ignored folder pip
    does not see. That folder is APPENDED to ``sys.path``, and only when it exists and
    ``dp_accounting`` is not importable otherwise (a pip-installed dpagg, the dev venv), so it
    never shadows an installed package. Covers the ComfyUI nodes, the WebUI tab and
    ``python -m dpagg_core.cli`` run from the pack folder.
    """
    deps = str(Path(__file__).resolve().parent.parent / "_deps")
    if deps in sys.path or not Path(deps).is_dir():
        return
    if importlib.util.find_spec("dp_accounting") is None:
        sys.path.append(deps)


_add_pack_deps()


# name -> the module that defines it; loaded by ``__getattr__`` on first use.
_LAZY = {
    "load_image_folder": "dpagg_core.io.images",
    "LoadedImages": "dpagg_core.io.images",
    "TIConfig": "dpagg_core.training.ti",
    "Trainer": "dpagg_core.training.train_run",
    "EmbeddingSet": "dpagg_core.io.embeddings",
    "calibrate": "dpagg_core.privacy.calibration",
    "epsilon_for": "dpagg_core.privacy.bounds",
    "PrivacyPlan": "dpagg_core.privacy.plan",
    "release_embeddings": "dpagg_core.aggregate.release",
    "ReleaseOutcome": "dpagg_core.aggregate.release",
    "Ledger": "dpagg_core.privacy.ledger",
    "DpaggError": "dpagg_core.errors",
}

__all__ = [  # the facade: ``train`` and the names of ``_LAZY``
    "DpaggError",
    "EmbeddingSet",
    "Ledger",
    "LoadedImages",
    "PrivacyPlan",
    "ReleaseOutcome",
    "TIConfig",
    "Trainer",
    "__version__",
    "calibrate",
    "epsilon_for",
    "load_image_folder",
    "release_embeddings",
    "train",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time ``__getattr__`` loads them
    from dpagg_core.aggregate.release import ReleaseOutcome, release_embeddings
    from dpagg_core.errors import DpaggError
    from dpagg_core.io.embeddings import EmbeddingSet
    from dpagg_core.io.images import LoadedImages, load_image_folder
    from dpagg_core.privacy.bounds import epsilon_for
    from dpagg_core.privacy.calibration import calibrate
    from dpagg_core.privacy.ledger import Ledger
    from dpagg_core.privacy.plan import PrivacyPlan
    from dpagg_core.training.ti import TIConfig
    from dpagg_core.training.train_run import Trainer


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dpagg_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def train(
    model: Any,
    images: Any,
    config: Any = None,
    *,
    device: str | None = None,
    family: str | None = None,
    prediction_type: str | None = None,
    ledger: Any = None,
) -> EmbeddingSet:
    """Per-image textual inversion: one embedding per picture of ``images``, trained in memory on
    the Stable Diffusion model ``model`` (a diffusers folder, or a single ``.safetensors`` /
    ``.ckpt`` checkpoint of SD 1.x, 2.x or SDXL; loaded offline). Returns a PRIVATE
    ``EmbeddingSet``: pass it to :func:`release_embeddings`; never save it where released files
    go (docs/privacy.md invariant 4).

    ``images``: a ``LoadedImages`` from :func:`load_image_folder` (resized to the training
    resolution here) or a folder path (loaded at that resolution through the same decode, and
    registered in ``ledger``: a path, None for the default ledger). ``config``: a
    :class:`TIConfig` (default ``TIConfig()``; ``resolution=None`` means the model's own).
    ``device``: ``'cuda'``, ``'cpu'``, ... (default: CUDA when available). ``family`` /
    ``prediction_type``: override the model's detection (``'sd1'``, ``'sd2'``, ``'sdxl'``;
    ``'epsilon'``, ``'v_prediction'``). A progress bar goes to stderr. For several trainings on
    one model, use :class:`Trainer` (it loads the model once)."""
    from dpagg_core.training.ti import TIConfig
    from dpagg_core.training.train_run import Trainer

    ledger_path = getattr(ledger, "path", ledger)  # a Ledger or its path
    trainer = Trainer(
        Path(model),
        TIConfig() if config is None else config,
        family=family,
        prediction_type=prediction_type,
        device=device,
        ledger=None if ledger_path is None else Path(ledger_path),
    )
    if isinstance(images, (str, os.PathLike)):
        images = trainer.images(Path(images))
    return trainer.train(images)
