"""A DP-SGD release end to end (``dpagg run --method dpsgd``): the baseline of
``dpagg_core.training.dpsgd`` released through the same ledger and file writer as DPAgg
(docs/privacy.md invariant 5).

Order (:func:`run_dpsgd`): the output name and folder are checked; the model and images are
loaded; the plan is calibrated (PLD over T Poisson steps at rate q = expected_batch / n,
replace-one); a dry run of the reservation (``Ledger.check_request``) then either finds an
identical completed request (its stored result is written again, nothing spent, nothing trained)
or refuses an over-budget request before any training. ``train_dpsgd`` calls ``Ledger.reserve``
after all its own checks and before the first noise draw (the spend is committed from then on);
the result is stored with ``Reservation.complete`` and written with
``released_file.write_released`` (post-processing, free). A failure after the reservation leaves
the spend recorded; re-running the identical request is charged again (a new attempt).

The request is the shared one: ``request_keys.training_request`` (the TI pipeline's
``inputs_request`` builds on it) over the image set's id, :func:`request_of` (the DP-SGD config
with its seed, a fingerprint of the loaded weights, the scheduler), the plan, C_g, the basis and
the name, answered by the same ledger calls. Two differences are the mechanism's, not a second
check: the noise is drawn in every training step, so the spend is reserved before the first step
(``before_noise``) instead of after training; and the model is named by the loaded weights
(``pipeline.weights_digest`` sits in a layer above this one).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpagg_core.aggregate.release import ReleaseOutcome, write_outcome
from dpagg_core.errors import DpaggError
from dpagg_core.io.embeddings import KIND_OF_FAMILY, EmbeddingSet
from dpagg_core.io.files import output_folder
from dpagg_core.io.names import next_free_name, sanitize_name
from dpagg_core.privacy.identity import fingerprint
from dpagg_core.privacy.ledger import Ledger, LedgerRelease, Reservation
from dpagg_core.privacy.mechanism import Release
from dpagg_core.privacy.plan import DEFAULT_DELTA
from dpagg_core.privacy.plan_text import delta_warning
from dpagg_core.privacy.request_keys import training_request
from dpagg_core.training import dpsgd
from dpagg_core.training.dpsgd import DPSGDConfig
from dpagg_core.training.ti import TIConfig, public_centre
from dpagg_core.training.train_run import Trainer, progress_bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DpsgdRequest:
    """What a DP-SGD release needs, all public. ``config.resolution`` None: the model's default.
    ``delta`` None: ``plan.DEFAULT_DELTA`` (a given delta above the safe default is warned
    about). ``basis``: a PUBLIC basis file (public-subspace DP-SGD). ``ledger``: the ledger file
    (None: the default); its key ids the images."""

    images: Path
    model: Path
    name: str
    out_dir: Path
    epsilon: float
    config: DPSGDConfig
    delta: float | None = None
    family: str | None = None
    prediction_type: str | None = None
    device: str | None = None
    ledger: Path | None = None
    budget_epsilon: float | None = None
    budget_delta: float | None = None
    basis: Path | None = None
    a1111_pt: bool = False


@dataclass(frozen=True)
class DpsgdRelease:
    """The written release and the loaded model (for a preview)."""

    outcome: ReleaseOutcome
    model: Any


class _Reused(Exception):
    """Raised from ``before_noise`` to stop training: an identical request is already complete."""


def request_of(config: DPSGDConfig, model: Any) -> dict[str, Any]:
    """Everything besides the images, plan, C_g, name and base model id that determines a DP-SGD
    release: the ledger hashes it into the request key (``request_keys.training_request``, the
    train-then-release key the TI pipeline's ``inputs_request`` also builds on). The weights are
    named by ``identity.fingerprint`` of 16 evenly spaced values of every tensor of the UNet, the
    VAE and the text encoder(s) (``base_model_id`` covers only the token table: a checkpoint
    whose text encoder alone differs trains a different embedding), the scheduler by its config.
    """
    pipe = model.pipe
    parts = [pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    weights = [t for part in parts if part is not None for t in part.state_dict().values()]
    return {
        "method": dpsgd.METHOD,
        "config": json.loads(json.dumps(dataclasses.asdict(config))),
        "family": model.family,
        "prediction_type": model.prediction_type,
        "model": fingerprint(weights, samples=16),
        "scheduler": json.loads(
            json.dumps(dict(pipe.scheduler.config), sort_keys=True, default=str)
        ),
    }


def _unflat(vector: Any, centre: dict[str, Any], model_family: str) -> dict[str, Any]:
    """A stored flat DP-SGD release back to ``{key: float32 [v, dim]}`` (``EmbeddingSet.unflat``
    with the shapes of the public centre)."""
    shapes = EmbeddingSet(
        vectors={k: c.unsqueeze(0) for k, c in centre.items()},
        kind=KIND_OF_FAMILY[model_family],
        model_family=model_family,
    )
    arr = np.asarray(vector, dtype=np.float64).reshape(-1)
    if arr.size != shapes.flat_dim:
        raise DpaggError(
            f"the stored DP-SGD release has {arr.size} values but this model and vectors need "
            f"{shapes.flat_dim}; the ledger row does not match this request"
        )
    return shapes.unflat(arr)


def run_dpsgd(req: DpsgdRequest) -> DpsgdRelease:
    """Train (or re-use) and write the DP-SGD release of ``req`` (module docstring for the order
    and the ledger calls); progress on stderr."""
    base = sanitize_name(req.name)
    out = output_folder(req.out_dir, "--out-dir")
    c = req.config
    trainer = Trainer(
        req.model,
        TIConfig(
            vectors=c.vectors,
            initializer=c.initializer,
            multi_token_initializer=c.multi_token_initializer,
            templates=c.templates,
            resolution=c.resolution,
            seed=c.seed,
        ),
        family=req.family,
        prediction_type=req.prediction_type,
        device=req.device,
        ledger=req.ledger,
    )
    loaded = trainer.images(req.images)
    n = loaded.count
    config = dataclasses.replace(c, resolution=trainer.resolution)
    dpsgd.validate_config(config, n)
    if req.delta is not None and (warning := delta_warning(req.delta, n)):
        log.warning("%s", warning)
    plan = dpsgd.calibrate_dpsgd(
        req.epsilon,
        DEFAULT_DELTA if req.delta is None else req.delta,
        n=n,
        q=config.sampling_rate(n),
        steps=config.steps,
    )
    backend, ledger = trainer.backend, Ledger(req.ledger)
    keys = tuple(backend.encoder_keys)
    # Public-subspace DP-SGD; a misfit basis is refused before all.
    basis = None if req.basis is None else trainer.basis(req.basis)
    request = request_of(config, trainer.model)
    if basis is not None:
        request["basis_sha256"] = basis.sha256
    ledger_request = training_request(
        request,
        dataset_id=loaded.dataset_id,
        plan=plan,
        name=base,
        clip_norm=float(config.clip_norm),
        centre_kind="initializer",
        base_model_id=backend.base_model_id or "",
        budget_epsilon=req.budget_epsilon,
        budget_delta=req.budget_delta,
    )

    def stored(result: LedgerRelease) -> tuple[dict[str, Any], dict[str, str]]:
        centre = public_centre(backend, trainer.config)
        vectors = _unflat(result.release.vector, centre, backend.model_family)
        return vectors, dict(result.release.record)

    # Over budget: refused here, before any training. Identical and complete: reused.
    probe = ledger.check_request(ledger_request)
    if probe.result is None and next_free_name(out, base) != base:
        raise DpaggError(
            f"an embedding named {base!r} already exists in {out}; dpagg never overwrites: choose "
            f"another --name (e.g. {next_free_name(out, base)!r}). Nothing was spent."
        )
    if probe.result is not None:
        result = probe.result
        vectors, record = stored(result)
    else:
        charged: list[Reservation] = []

        def before_noise(_plan: Any) -> None:
            reservation = ledger.reserve(ledger_request)  # commits the spend, or BudgetExceeded
            charged.append(reservation)
            if reservation.reused:  # a concurrent identical run completed meanwhile
                raise _Reused()

        update, close = progress_bar(f"DP-SGD TI ({n} images, {config.steps} steps)")
        try:
            trained = dpsgd.train_dpsgd(
                backend,
                loaded.pixels,
                config,
                plan=plan,
                before_noise=before_noise,
                progress=update,
                basis=basis,
            )
        except _Reused:
            trained = None
        except KeyboardInterrupt:
            if charged:
                log.warning("interrupted after the charge: its privacy cost stays spent")
            raise
        except Exception as exc:
            if not charged:
                raise  # failed before the charge: nothing spent
            raise DpaggError(
                f"DP-SGD failed after its privacy cost was charged (ledger {ledger.path}, release "
                f"#{charged[0].release_id}, attempt {charged[0].attempt}): {exc}. The spend stays "
                "recorded (noise may have been drawn); re-running the identical command trains "
                "and charges again."
            ) from exc
        finally:
            close()
        reservation = charged[0]
        if trained is None:
            assert reservation.result is not None
            result = reservation.result
            vectors, record = stored(result)
        else:
            vectors = {k: trained.vectors[k] for k in keys}  # float32 [v, dim]
            record = dict(trained.record)
            flat = np.concatenate([vectors[k].double().reshape(-1).numpy() for k in keys])
            try:
                result = reservation.complete(flat, record)
            except DpaggError as exc:  # the spend is recorded; the result is still DP
                log.warning(
                    "release #%d is spent but its result could not be stored in the ledger "
                    "(%s); the file is written, but re-running this command would spend again",
                    reservation.release_id,
                    exc,
                )
                result = LedgerRelease(
                    **vars(reservation.state),
                    release=Release(vector=flat, record=record),
                    reused=False,
                    release_id=reservation.release_id,
                )
    outcome = write_outcome(
        out, base, vectors, record, result, a1111_pt=req.a1111_pt, ledger=ledger
    )
    return DpsgdRelease(outcome=outcome, model=trainer.model)
