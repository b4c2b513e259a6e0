"""One train-then-release pipeline: images + model + TI config + plan + release options ->
outcome (issue 19 item 2), used by ``dpagg run`` and the demo.

Re-runs are keyed by what the user asked, not by the bits training produced. The ledger request
of a trained release is :func:`request_keys.inputs_request` over the image set's id, the TI
configuration (with its seed), a digest of the model's weights (:func:`weights_digest`) and the
plan, C, centre, basis, mode and name. So:

1. an identical request is answered from the ledger's record BEFORE any training (a shape-only
   set of the public initializer centre lays out the file; ``release_embeddings(recorded_only=
   True)``), and spends nothing, even after the released file was deleted and even when training
   is not bit-reproducible (GPUs): post-processing of a recorded release is free (Dwork & Roth
   2014, Prop. 2.1);
2. otherwise an over-budget request is refused before training (``Ledger.check``), then the
   per-image embeddings are trained (progress and cancel as callbacks of the ``Trainer``) and
   released through the ledger (reserve -> noise -> complete).

A deliberately new release of the same pictures is a new name or a new seed. CLIP image
embeddings (``method='clip'``) are deterministic and keep the key of their vectors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpagg_core.aggregate.release import NotRecorded, ReleaseOutcome, release_embeddings
from dpagg_core.paths import resolve_path
from dpagg_core.privacy.accountant import PrivacyPlan
from dpagg_core.privacy.ledger import Ledger
from dpagg_core.training import ti  # ti.train_embeddings read at call time: tests replace it

WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".sft"})
_digests: dict[tuple[Any, ...], str] = {}


def weights_digest(model: str | os.PathLike[str]) -> str:
    """SHA-256 over the model's files (a checkpoint file, or every weight and config file of a
    diffusers folder, by relative path): whatever shapes training. The token-table fingerprint
    (``base_model_id``) misses a fine-tune that kept its text encoder; this does not. Cached per
    process by path, size and modification time (hashing reads the files once: about a second
    per GB)."""
    root = resolve_path(model)
    files = (
        [root]
        if root.is_file()
        else sorted(
            p
            for p in root.rglob("*")
            if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.suffix in {".json", ".txt"})
        )
    )
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if stamp in _digests:
        return _digests[stamp]
    total = hashlib.sha256(b"dpagg-model-weights/1")
    for f in files:
        part = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 23), b""):
                part.update(chunk)
        name = f.name if f == root else str(f.relative_to(root))
        total.update(name.encode() + b"\x00" + part.digest())
    _digests[stamp] = total.hexdigest()
    return _digests[stamp]


def _json(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_json(v) for v in value]
    return value


def run_inputs(trainer: Any) -> dict[str, Any]:
    """Everything a trained release depends on besides the images and the release options:
    the method, the full TI configuration (seed included), the training resolution and the
    model's weights digest: ``trainer.model_weights`` where the host names the model itself
    (ComfyUI: its objects as patched in the graph, ``nodes/comfy_model_key.model_key``), else
    :func:`weights_digest` of ``trainer.model_path``. JSON values; they key the ledger request."""
    config = {k: _json(v) for k, v in dataclasses.asdict(trainer.config).items()}
    weights = getattr(trainer, "model_weights", None)
    return {
        "method": trainer.method,
        "config": config,
        "resolution": int(trainer.resolution),
        "model_weights": weights or weights_digest(Path(trainer.model_path)),
    }


@dataclass
class LoadedModelTrainer:
    """The pipeline's trainer over a model a host already loaded (the WebUI's): per-image TI on
    ``backend`` with ``config``; ``progress(done, total)`` and ``should_cancel()`` are the host's
    (``training.ti.train_embeddings``). ``model_path`` names the weights for the request key.
    ``ledger`` (a path) keys :meth:`images`, as ``training.train_run.Trainer.images`` does, so
    the rehearsal and the public basis (``rehearsal.rehearse``, ``training.public``) take this
    trainer too."""

    backend: Any
    config: Any
    model_path: str | os.PathLike[str]
    progress: Callable[[int, int], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    method: str = "ti"
    ledger: str | os.PathLike[str] | None = None

    @property
    def resolution(self) -> int:
        return int(self.config.resolution)

    def images(self, folder: str | os.PathLike[str], *, public: bool = False) -> Any:
        """The image folder through the canonical decode at the training resolution; ``public``:
        PUBLIC pictures (refused where the ledger knows any as private; not registered)."""
        from dpagg_core.io.images import load_image_folder

        return load_image_folder(
            folder, resolution=self.resolution, ledger=self.ledger, public=public
        )

    def train(self, loaded: Any) -> Any:
        return ti.train_embeddings(
            self.backend,
            loaded.pixels,
            self.config,
            dataset_id=loaded.dataset_id,
            progress=self.progress,
            should_cancel=self.should_cancel,
        )


def train_and_release(
    trainer: Any,
    loaded: Any,
    plan: PrivacyPlan,
    *,
    ledger: Ledger,
    before_release: Callable[[], None] | None = None,
    **options: Any,
) -> ReleaseOutcome | None:
    """The pipeline (module docstring) for ``loaded`` private images on ``trainer``'s model.
    ``options`` are :func:`release_embeddings`' (clip_norm, name, out_dir, centre, mode,
    budget_*, basis, postprocess, public_centre, ...). Returns None on torchrun ranks other than
    0 (rank 0 releases). ``before_release()`` runs after training, before the ledger reserves
    (a host's last cancel point: raising there spends nothing)."""
    if trainer.method != "ti":
        _refuse_over_budget(ledger, loaded, plan, options)
        eset = trainer.train(loaded)
        return (
            None if eset is None else release_embeddings(eset, plan=plan, ledger=ledger, **options)
        )
    inputs = run_inputs(trainer)
    shape = ti.untrained_set(
        trainer.backend, loaded.count, trainer.config, dataset_id=loaded.dataset_id
    )
    try:  # an identical request: its recorded release, nothing trained or spent
        return release_embeddings(
            shape, plan=plan, ledger=ledger, inputs=inputs, recorded_only=True, **options
        )
    except NotRecorded:
        pass
    _refuse_over_budget(ledger, loaded, plan, options)
    eset = trainer.train(loaded)
    if eset is None:
        return None
    if before_release is not None:
        before_release()
    return release_embeddings(eset, plan=plan, ledger=ledger, inputs=inputs, **options)


def _refuse_over_budget(ledger: Ledger, loaded: Any, plan: PrivacyPlan, options: Any) -> None:
    """An over-budget request is refused before hours of training, not just before the noise
    (the ledger's dry run; a concurrent release may still take the budget first)."""
    ledger.check(
        loaded.dataset_id,
        plan,
        budget_epsilon=options.get("budget_epsilon"),
        budget_delta=options.get("budget_delta"),
    )
