"""One release, end to end: EmbeddingSet -> ledger (budget, DP mean) -> released embedding file.

Shared by the CLI and the ComfyUI DP Aggregate node so both follow the same order:

1. everything that can be wrong with the request (name, output folder, centre, shapes) is checked
   BEFORE the ledger is touched, so bad input never spends budget;
2. :func:`release_vectors` (the DP mean of given vectors under the ledger's reserve -> compute ->
   complete) reserves the spend (budget check, committed row) before the noise is drawn, then
   stores the result (docs/privacy.md invariant 5); an identical earlier request returns the
   stored release;
3. the released vector is (optionally) post-processed (``dpagg_core.aggregate.postprocess``:
   James-Stein shrinkage, norm rescaling; functions of the release and public values only) and
   written with :func:`released_file.write_released`. Both are post-processing of a DP output (Dwork
   & Roth 2014, Prop. 2.1), so if writing fails the release stays spent, and re-running the
   identical request writes it again without spending. The ledger keeps the RAW release; a re-run
   post-processes the stored raw release the same way and finds the same file.

With a public ``basis`` (``dpagg_core.privacy.basis.PublicBasis``) the mean is aggregated in that
subspace (``basis.dp_mean_projected``); the basis is checked against the set (family, base model,
D) before the ledger is touched.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpagg_core import options
from dpagg_core.aggregate.postprocess import METHODS as POSTPROCESS_METHODS
from dpagg_core.aggregate.postprocess import apply as postprocess_apply
from dpagg_core.errors import DpaggError
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.io.files import output_folder
from dpagg_core.io.names import next_free_name, sanitize_name
from dpagg_core.io.public_embeddings import PublicCentre, public_mean_centre
from dpagg_core.io.released_file import read_released, write_released
from dpagg_core.paths import resolve_path
from dpagg_core.privacy import mechanism
from dpagg_core.privacy.accountant import PrivacyPlan, checked_plan
from dpagg_core.privacy.basis import PublicBasis, check_basis, dp_mean_projected
from dpagg_core.privacy.ledger import BudgetState, Ledger, LedgerRelease
from dpagg_core.privacy.request_keys import (
    Request,
    aggregate_request,
    check_ids,
    inputs_request,
)

log = logging.getLogger(__name__)

CENTRES = options.CENTRES


class NotRecorded(DpaggError):
    """``release_embeddings(recorded_only=True)`` found no recorded answer (nothing written)."""


@dataclass(frozen=True, kw_only=True)
class ReleaseOutcome(BudgetState):
    """What a release produced: the file, the prompt string and the ledger's view afterwards."""

    path: Path
    name: str
    record: dict[str, str]
    reused: bool
    release_id: int
    vectors: dict[str, torch.Tensor]

    @property
    def prompt(self) -> str:
        """The exact prompt fragment that selects this release in ComfyUI."""
        return f"embedding:{self.name}"

    def summary(self) -> dict[str, Any]:
        return {
            "file": str(self.path),
            "prompt": self.prompt,
            "reused": self.reused,
            "release_id": self.release_id,
            "record": self.record,
            "budget": {
                "epsilon": self.budget_epsilon,
                "delta": self.budget_delta,
                "spent_epsilon": self.spent_epsilon,
                "spent_delta": self.spent_delta,
                "remaining_epsilon": self.remaining_epsilon,
                "composition": self.composition,
            },
        }


PUBLIC_EMBEDDINGS_HINT = (
    "`dpagg public-basis --public-images DIR --save-public-embeddings FILE` (the file the CLI's "
    "`--centre public_mean --public-embeddings FILE` takes), from PUBLIC images only"
)


def check_public_centre_inputs(centre: Any, public_embeddings_file: Any) -> str | None:
    """Why ``centre`` and a ``public_embeddings_file`` path do not go together (None when they
    do): an unknown centre, public_mean without a file or with a missing one, a file with another
    centre. Cheap checks only (the file is not read): :func:`centre_vector` then refuses a private
    file, an EmbeddingSet or another model's embeddings, still before the ledger reserves
    anything. For a front end's checks before anything runs."""
    if centre not in CENTRES:
        return f"centre={centre!r}: use one of {list(CENTRES)}"
    text = str(public_embeddings_file or "").strip()
    if centre == "public_mean":
        if not text:
            return (
                "centre=public_mean needs public_embeddings_file: the per-image embeddings of "
                f"PUBLIC images written by {PUBLIC_EMBEDDINGS_HINT}. Nothing was spent."
            )
        if not resolve_path(text).is_file():
            return (
                f"public_embeddings_file: {resolve_path(text)} does not exist; write it with "
                f"{PUBLIC_EMBEDDINGS_HINT}. Nothing was spent."
            )
    elif text:
        return (
            f"public_embeddings_file is only used with centre=public_mean, not centre={centre!r}: "
            "clear it or choose centre=public_mean. Nothing was spent."
        )
    return None


def centre_vector(
    eset: EmbeddingSet, centre: str, public_centre: Any = None, *, ledger: Ledger | None = None
) -> np.ndarray | None:
    """The public centre to clip around: the initializer token's embedding, the origin, or
    (``'public_mean'``) the mean embedding of PUBLIC images, given as ``public_centre``: a
    ``PublicCentre`` or ``PublicEmbeddings`` (``dpagg_core.io.public_embeddings``, or their file).
    Anything built from the private set is refused (docs/privacy.md invariant 2). With ``ledger``,
    a file must be authentic under its key and none of its source pictures private there
    (``public_embeddings.load_public_embeddings``)."""
    if centre not in CENTRES:
        raise DpaggError(f"centre={centre!r} is unknown; use one of {CENTRES}")
    if centre != "public_mean" and public_centre is not None:
        raise DpaggError(f"public_centre is only used with centre='public_mean', not {centre!r}")
    if centre == "public_mean":
        if public_centre is None:
            raise DpaggError(
                "centre='public_mean' needs the embeddings of PUBLIC images (a PublicCentre, "
                "PublicEmbeddings or their file: `dpagg public-basis --save-public-embeddings`); "
                "it is never computed from the private set"
            )
        pc = (
            public_centre
            if isinstance(public_centre, PublicCentre)
            else public_mean_centre(public_centre, ledger=ledger)
        )
        if pc.model_family != eset.model_family or pc.base_model_id != eset.base_model_id:
            raise DpaggError(
                f"the public centre is for {pc.model_family} model {pc.base_model_id!r} but the "
                f"embeddings are {eset.model_family} on {eset.base_model_id!r}; train the public "
                "embeddings with the same model"
            )
        flat = pc.flat()
        if flat.size != eset.flat_dim:
            raise DpaggError(
                f"the public centre has D={flat.size} values ({pc.num_vectors} vector(s)) but each "
                f"embedding has D={eset.flat_dim} ({eset.num_vectors}); use the same --vectors"
            )
        return flat
    if centre == "origin":
        return None
    flat = eset.flat_centre()
    if flat is None:
        raise DpaggError(
            f"centre='initializer' but this {eset.kind} set has no initializer embedding; "
            "use centre='origin' (natural for L2-normalised CLIP image embeddings)"
        )
    return flat


def _existing_release(out_dir: Path, vectors: dict[str, torch.Tensor]) -> Path | None:
    """A file in ``out_dir`` that already holds exactly these released tensors, if any."""
    if not out_dir.is_dir():
        return None
    for path in sorted(out_dir.glob("*.safetensors")):
        try:
            tensors, record = read_released(path)
        except DpaggError:
            continue
        if record.get("format", "").startswith("dpagg-release") and set(tensors) == set(vectors):
            if all(torch.equal(tensors[k], vectors[k].float()) for k in vectors):
                return path
    return None


def default_centre(eset: EmbeddingSet) -> str:
    """THE default centre, in one place: the initializer when the set has one, else the origin
    (CLIP image embeddings). A public choice: it depends only on the set's kind."""
    return "initializer" if eset.centre is not None else "origin"


def check_postprocess_method(postprocess: str) -> None:
    if postprocess not in POSTPROCESS_METHODS:
        raise DpaggError(f"postprocess={postprocess!r}; use one of {list(POSTPROCESS_METHODS)}")


def postprocess_targets(
    postprocess: str,
    basis: PublicBasis | None,
    target_norms: dict[str, float] | None = None,
    prior: Any = None,
) -> dict[str, float] | None:
    """The public inputs ``postprocess`` needs, checked before anything is trained or spent: the
    target norms of ``'norm'`` (given, or the basis' typical norms) and the prior of
    ``'wiener'``. Returns the target norms to use."""
    check_postprocess_method(postprocess)
    if "norm" in postprocess and target_norms is None:
        if basis is None:
            raise DpaggError(
                f"postprocess={postprocess!r} rescales to a public typical norm: pass a public "
                "basis (its typical norms) or target_norms"
            )
        target_norms = dict(basis.typical_norms)
    if "wiener" in postprocess and prior is None:
        raise DpaggError(
            f"postprocess={postprocess!r} needs a public prior (postprocess.WienerPrior."
            "from_style_means of public images grouped by style)"
        )
    return target_norms


def draw_mean(
    vectors: Any,
    *,
    plan: PrivacyPlan,
    clip_norm: float,
    center: Any,
    mode: str,
    base_model_id: str,
    centre_kind: str,
    basis: PublicBasis | None = None,
) -> mechanism.Release:
    """One draw of the mean mechanism a release uses: ``mechanism.dp_mean`` in the full space,
    ``basis.dp_mean_projected`` in a public basis. Accounting is the caller's: the ledger's
    reservation (:func:`draw_release`), or none for PUBLIC data (``rehearsal``)."""
    extra: dict[str, Any] = {} if basis is None else {"basis": basis}
    mean: Callable[..., mechanism.Release] = (
        mechanism.dp_mean if basis is None else dp_mean_projected
    )
    return mean(
        vectors,
        plan=plan,
        clip_norm=clip_norm,
        center=center,
        mode=mode,
        base_model_id=base_model_id,
        centre_kind=centre_kind,
        **extra,
    )


def release_embeddings(
    eset: EmbeddingSet,
    *,
    plan: PrivacyPlan,
    clip_norm: float,
    name: str,
    out_dir: str | os.PathLike[str],
    ledger: Ledger,
    centre: str | None = None,
    mode: str = "clip",
    budget_epsilon: float | None = None,
    budget_delta: float | None = None,
    new_name_per_release: bool = False,
    a1111_pt: bool = False,
    basis: Any = None,
    postprocess: str = "none",
    target_norms: dict[str, float] | None = None,
    public_centre: Any = None,
    inputs: Mapping[str, Any] | None = None,
    recorded_only: bool = False,
    prior: Any = None,
) -> ReleaseOutcome:
    """Release one DP mean of ``eset`` and write it as ``<out_dir>/<name>.safetensors``.

    Privacy: the mechanism is the Gaussian mean of :func:`mechanism.dp_mean` (replace-one
    sensitivity 2C/denominator around a public centre), accounted by ``plan`` and charged to
    ``eset.dataset_id`` in the ledger. ``clip_norm`` and ``centre`` must be public choices.

    ``new_name_per_release`` (ComfyUI): a new release gets the first free ``name``, ``name-2``,
    ... so prompt caches never serve an old release; otherwise (CLI) an existing ``name`` is an
    error raised before anything is spent. An identical earlier request (same data, plan, C,
    centre, mode, name, basis) spends nothing and returns the file that already holds it.

    ``basis``: a public ``privacy.basis.PublicBasis`` to aggregate in (None: the full space).
    ``postprocess``: ``'none'``, ``'js'``, ``'norm'`` or ``'js+norm'``
    (``dpagg_core.aggregate.postprocess``), applied to the raw release after the ledger; ``norm``
    rescales to ``target_norms`` (public, per key) or, by default, the basis' ``typical_norms``. It
    is not part of the request: a re-run with another post-processing reuses the recorded release
    (nothing spent) and writes the new post-processed file under the next free name if ``name`` is
    taken. ``'wiener'`` / ``'wiener+norm'`` need ``prior``, a public
    ``postprocess.WienerPrior`` (refused before anything is spent without one).

    ``centre='public_mean'`` with ``public_centre`` (``PublicCentre`` /
    ``PublicEmbeddings`` of PUBLIC images, or their file): clip around the public images' mean
    embedding; the record says ``centre: public_mean`` and its ``centre_sha256``
    (:func:`centre_vector`). James-Stein post-processing then shrinks toward that centre.
    ``centre=None``: THE default, in one place: the initializer when the set has one, else the
    origin (CLIP image embeddings).

    ``inputs`` (``dpagg_core.pipeline``): ``eset`` was trained from the images with these
    inputs, and the request is keyed by them, not by the vectors (a re-run is recognised even if
    training is not bit-reproducible). ``recorded_only``: answer only from the ledger's record
    of the identical request; without one raise :class:`NotRecorded` before the ledger is
    written (``eset`` may then be a shape-only set: its vectors never reach the mechanism).
    """
    centre = centre or default_centre(eset)
    check_postprocess_method(postprocess)
    if basis is not None:
        check_basis(
            basis,
            flat_dim=eset.flat_dim,
            base_model_id=eset.base_model_id,
            model_family=eset.model_family,
            vectors=eset.num_vectors,
        )
    target_norms = postprocess_targets(postprocess, basis, target_norms, prior)
    base = sanitize_name(name)
    out = output_folder(out_dir)
    centre_vec = centre_vector(eset, centre, public_centre, ledger=ledger)
    if not eset.dataset_id:
        raise DpaggError("this embedding set has no dataset_id; it is needed to keep its budget")
    vectors = eset.flat()
    request = {
        "dataset_id": eset.dataset_id,
        "plan": plan,
        "clip_norm": clip_norm,
        "centre_kind": centre,
        "mode": mode,
        "name": base,
        "base_model_id": eset.base_model_id,
    }
    prepared = vectors_request(
        vectors,
        center=centre_vec,  # the mechanism's keyword (``center``, as numpy spells it)
        budget_epsilon=budget_epsilon,
        budget_delta=budget_delta,
        basis=basis,
        inputs=inputs,
        **request,
    )
    recorded = ledger.stored_result(prepared.request)
    target = base
    if recorded is None:
        if new_name_per_release:
            target = next_free_name(out, base)
        elif next_free_name(out, base) != base:
            raise DpaggError(
                f"an embedding named {base!r} already exists in {out}; dpagg never overwrites: "
                f"choose another --name (e.g. {next_free_name(out, base)!r}). Nothing was spent."
            )
        if recorded_only:
            raise NotRecorded("no recorded release answers this request; nothing was written")

    result = draw_release(ledger, prepared)
    # Post-processing: the raw release (as stored in the ledger) and public values only.
    vec, extra = postprocess_apply(
        result.release.vector,
        method=postprocess,
        record=result.release.record,
        layout=[(k, eset.num_vectors, w) for k, w in eset.encoder_widths.items()],
        centre=centre_vec,
        target_norms=target_norms,
        prior=prior,
    )
    released = eset.unflat(vec)
    if result.reused:
        # Free either way: the identical file if it exists, else the first free name (a new
        # post-processing of a recorded release must not collide with the earlier file).
        target = next_free_name(out, base)
    return write_outcome(
        out,
        target,
        released,
        {**result.release.record, **extra},
        result,
        a1111_pt=a1111_pt,
        ledger=ledger,
    )


@dataclass(frozen=True, eq=False)
class VectorsRequest:
    """A checked request for one DP mean of ``vectors`` (:func:`vectors_request`): the ledger's
    :class:`Request` and the checked float64 inputs of the mechanism. Draws nothing."""

    request: Request
    vectors: np.ndarray
    center: np.ndarray | None
    plan: PrivacyPlan
    clip_norm: float
    centre_kind: str
    mode: str
    base_model_id: str
    basis: PublicBasis | None


def vectors_request(
    vectors: Any,
    *,
    dataset_id: str,
    plan: PrivacyPlan,
    clip_norm: float,
    center: np.ndarray | None = None,
    centre_kind: str = "origin",
    name: str,
    base_model_id: str = "",
    budget_epsilon: float | None = None,
    budget_delta: float | None = None,
    mode: str = "clip",
    basis: Any = None,
    inputs: Mapping[str, Any] | None = None,
) -> VectorsRequest:
    """Check one DP mean of ``vectors`` [n, D] and build its ledger request, drawing nothing.

    Everything ``dp_mean`` would refuse is refused here (``mechanism.check_inputs``), before the
    ledger is opened, so bad input never spends budget; so is a ``basis`` for another D or
    another ``base_model_id``. The basis' sha256 enters the request key. ``inputs``: the
    vectors were trained here from the images with these inputs (``pipeline.run_inputs``); the
    request is then keyed by them instead of by the vectors
    (``request_keys.inputs_request``)."""
    check_ids(dataset_id, "release", name=name)
    checked_plan(plan)
    arr, ctr = mechanism.check_inputs(vectors, plan, clip_norm, center, mode=mode)
    if basis is not None:
        check_basis(basis, flat_dim=arr[0].size, base_model_id=base_model_id)
    keying = aggregate_request if inputs is None else partial(inputs_request, inputs)
    request = keying(
        *([arr] if inputs is None else []),
        dataset_id=dataset_id,
        plan=plan,
        clip_norm=clip_norm,
        center=ctr,
        centre_kind=centre_kind,
        mode=mode,
        name=name,
        base_model_id=base_model_id,
        basis_sha256=None if basis is None else basis.sha256,
        budget_epsilon=budget_epsilon,
        budget_delta=budget_delta,
    )
    return VectorsRequest(
        request=request,
        vectors=arr,
        center=ctr,
        plan=plan,
        clip_norm=clip_norm,
        centre_kind=centre_kind,
        mode=mode,
        base_model_id=base_model_id,
        basis=basis,
    )


def draw_release(ledger: Ledger, prepared: VectorsRequest) -> LedgerRelease:
    """:meth:`Ledger.reserve` the request, then the mechanism (``mechanism.dp_mean``, or
    ``basis.dp_mean_projected`` with a basis), then :meth:`Reservation.complete`. An identical
    completed request returns its stored release and draws nothing. The stored vector is the
    raw release in the full D (post-processing comes after)."""
    with ledger.reserve(prepared.request) as reservation:
        if reservation.result is not None:
            return reservation.result
        drawn = draw_mean(
            prepared.vectors,
            plan=prepared.plan,
            clip_norm=prepared.clip_norm,
            center=prepared.center,
            mode=prepared.mode,
            base_model_id=prepared.base_model_id,
            centre_kind=prepared.centre_kind,
            basis=prepared.basis,
        )
        return reservation.complete(drawn.vector, drawn.record)


def release_vectors(
    ledger: Ledger,
    vectors: Any,
    *,
    dataset_id: str,
    plan: PrivacyPlan,
    clip_norm: float,
    center: np.ndarray | None = None,
    centre_kind: str = "origin",
    name: str,
    base_model_id: str = "",
    budget_epsilon: float | None = None,
    budget_delta: float | None = None,
    mode: str = "clip",
    basis: Any = None,
) -> LedgerRelease:
    """Release one DP mean of ``vectors`` [n, D] under ``plan``, charged to ``dataset_id`` in
    ``ledger`` (formerly ``Ledger.release``): :func:`vectors_request` (every check, nothing
    drawn), then :func:`draw_release` (reserve -> ``mechanism.dp_mean`` -> complete).

    ``basis`` (a ``dpagg_core.privacy.basis.PublicBasis``): aggregate in that public subspace
    (``basis.dp_mean_projected``; same plan and sensitivity). Its sha256 enters the request key
    and the record; a basis for another D or another ``base_model_id`` is refused before the
    ledger is opened. The stored vector is the raw release in the full D.
    """
    prepared = vectors_request(
        vectors,
        dataset_id=dataset_id,
        plan=plan,
        clip_norm=clip_norm,
        center=center,
        centre_kind=centre_kind,
        name=name,
        base_model_id=base_model_id,
        budget_epsilon=budget_epsilon,
        budget_delta=budget_delta,
        mode=mode,
        basis=basis,
    )
    return draw_release(ledger, prepared)


def write_outcome(
    out: Path,
    target: str,
    vectors: dict[str, torch.Tensor],
    record: dict[str, str],
    result: Any,
    *,
    a1111_pt: bool = False,
    ledger: Any = None,
) -> ReleaseOutcome:
    """Write a recorded release (``result``: a ledger release or charge) as ``<target>``, unless
    it is a re-used release already on disk in ``out``. Post-processing: costs nothing. With
    ``ledger``, the name of a newly written file is noted there (``Ledger.note_file``), so the
    ledger shows ``mystyle-2`` for a request named ``mystyle``."""
    path = _existing_release(out, vectors) if result.reused else None
    if path is None:
        try:
            path = write_released(out, target, vectors, record, a1111_pt=a1111_pt)
        except DpaggError as exc:
            raise DpaggError(
                f"release {result.release_id} is recorded and its budget spent, but writing the "
                f"file failed: {exc}. Re-run the identical command to write it without spending "
                "again."
            ) from exc
        if ledger is not None:
            try:
                ledger.note_file(result.release_id, path.stem)
            except DpaggError as exc:  # display only: the release and its file are complete
                log.warning("could not note file %s in the ledger: %s", path.name, exc)
    return ReleaseOutcome(
        path=path,
        name=path.stem,
        record=record,
        reused=result.reused,
        release_id=result.release_id,
        vectors=vectors,
        **vars(result.budget_state()),
    )
