"""Requests and their keys: an identical re-run is answered from the ledger, not drawn again.

A release is a function of its inputs and fresh noise. Two requests with equal keys would be
answered by the same mechanism on the same data, so the ledger returns the recorded answer instead
of drawing new noise (post-processing is free, Dwork & Roth 2014, Prop. 2.1). The digests here are
PRIVATE (functions of the per-image embeddings or of the private image set's id): the ledger
stores only their HMAC under its identity key (:func:`request_mac`), never the digest itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dpagg_core.errors import DpaggError
from dpagg_core.privacy import mechanism
from dpagg_core.privacy.composition import CHARGE_MODES, calls_of_row, check_plan_cost
from dpagg_core.privacy.plan import PrivacyPlan, checked_plan


def _as_float64(vectors: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(vectors, dtype=np.float64))


def request_key(
    vectors: np.ndarray,
    *,
    dataset_id: str,
    plan: PrivacyPlan,
    clip_norm: float,
    center: np.ndarray | None,
    centre_kind: str,
    mode: str,
    name: str,
    base_model_id: str,
    basis_sha256: str | None = None,
) -> str:
    """Digest (sha256) of every input that determines the release (length-prefixed).

    PRIVATE: it is a function of the per-image embeddings. It is never stored; the ledger
    stores its MAC under the ledger key (:func:`request_mac`).

    Two requests with the same key would be answered by the same mechanism on the same data, so
    the stored answer is returned instead of a fresh draw (post-processing is free).
    ``base_model_id`` is included because it is written into the stored privacy record.
    ``basis_sha256`` (a projected release, ``dpagg_core.privacy.basis``) is appended only when
    given, so the keys of full-space requests are unchanged.
    """
    arr = _as_float64(vectors)
    content = hashlib.sha256(
        json.dumps(list(arr.shape)).encode() + arr.astype("<f8", copy=False).tobytes()
    ).hexdigest()
    centre_bytes = b"none" if center is None else _as_float64(center).astype("<f8").tobytes()
    h = hashlib.sha256()
    for tag, value in (
        ("dpagg-ledger-request", b"v1"),
        ("dataset_id", dataset_id.encode()),
        ("vectors", content.encode()),
        ("plan", json.dumps(plan.to_dict(), sort_keys=True).encode()),
        ("clip_norm", float(clip_norm).hex().encode()),
        ("center", centre_bytes),
        ("centre_kind", centre_kind.encode()),
        ("mode", mode.encode()),
        ("name", name.encode()),
        ("base_model_id", base_model_id.encode()),
    ) + ((("basis_sha256", basis_sha256.encode()),) if basis_sha256 is not None else ()):
        for part in (tag.encode(), value):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()


def charge_key(
    *,
    dataset_id: str,
    plan: PrivacyPlan,
    request: Mapping[str, Any],
    clip_norm: float,
    centre_kind: str,
    mode: str,
    name: str,
    base_model_id: str,
) -> str:
    """Digest (sha256) identifying a train-then-release request (DP-SGD); stored
    only as its MAC under the ledger key, like :func:`request_key`.

    The result of such a request is not a function of stored inputs the ledger can hash (the
    per-image embeddings of :func:`request_key`); ``request`` therefore names everything else that
    determines it: the training configuration, a model fingerprint and the like (JSON values).
    The private images enter through ``dataset_id``. Equal keys mean the same mechanism on the
    same data, so a completed result may be returned instead of a fresh run.
    """
    try:
        payload = json.dumps(
            {
                "tag": "dpagg-ledger-charge/v1",
                "dataset_id": dataset_id,
                "plan": plan.to_dict(),
                "request": dict(request),
                "clip_norm": float(clip_norm).hex(),
                "centre_kind": centre_kind,
                "mode": mode,
                "name": name,
                "base_model_id": base_model_id,
            },
            sort_keys=True,
            allow_nan=False,
            separators=(",", ":"),
        )
    except (TypeError, ValueError) as exc:
        raise DpaggError(
            f"charge request {request!r} is not plain JSON data ({exc}); pass strings, numbers, "
            "booleans, lists and dicts only."
        ) from exc
    return hashlib.sha256(payload.encode()).hexdigest()


def request_mac(secret: bytes, digest: str) -> str:
    """HMAC-SHA256 of a request digest under the ledger key: the value stored as
    ``request_key``. The unkeyed digest is a function of the per-image embeddings; stored as is,
    anyone reading the ledger could confirm a guessed image set by recomputing it."""
    return hmac.new(secret, b"dpagg-request/2\x00" + digest.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Request:
    """One release request, as the ledger sees it (``Ledger.reserve``): validated on creation, so
    a bad request never reaches the ledger (nothing is written or spent for it).

    ``digest`` is the PRIVATE unkeyed key (:func:`request_key` for an aggregate of given vectors,
    :func:`charge_key` for a train-then-release run); build requests with
    :func:`aggregate_request` or :func:`training_request`. ``mode`` is a clipping mode
    (``mechanism.CLIP_MODES``, one ``dp_mean`` call) or ``'dpsgd'`` (all ``plan.releases`` calls of
    its plan in one row). ``budget_*`` caps the dataset's budget for this request (``None``: the
    recorded budget, or this release's own cost for a new dataset).
    """

    dataset_id: str
    plan: PrivacyPlan
    digest: str
    name: str
    clip_norm: float
    centre_kind: str
    mode: str
    base_model_id: str = ""
    budget_epsilon: float | None = None
    budget_delta: float | None = None

    def __post_init__(self) -> None:
        check_ids(self.dataset_id, "release", name=self.name)
        if self.mode not in mechanism.CLIP_MODES + CHARGE_MODES:
            raise DpaggError(
                f"mode={self.mode!r} is invalid: use one of {mechanism.CLIP_MODES + CHARGE_MODES}."
            )
        if not isinstance(self.centre_kind, str) or not isinstance(self.base_model_id, str):
            raise DpaggError("centre_kind and base_model_id must be strings.")
        checked_plan(self.plan)
        check_budget_value(self.budget_epsilon, self.budget_delta, "budget")
        # The record the result will carry must be valid (C > 0 and finite, public strings).
        mechanism.privacy_record(
            self.plan,
            self.clip_norm,
            mode=self.mode if self.mode in mechanism.CLIP_MODES else "clip",
            centre_kind=self.centre_kind,
            base_model_id=self.base_model_id,
        )
        check_plan_cost(self.plan)

    @property
    def calls(self) -> int:
        """Mechanism calls this request stands for (``composition.calls_of_row``)."""
        return calls_of_row(self.plan, self.mode)


def aggregate_request(
    vectors: np.ndarray,
    *,
    dataset_id: str,
    plan: PrivacyPlan,
    clip_norm: float,
    center: np.ndarray | None,
    centre_kind: str,
    mode: str,
    name: str,
    base_model_id: str = "",
    basis_sha256: str | None = None,
    budget_epsilon: float | None = None,
    budget_delta: float | None = None,
) -> Request:
    """The request for one DP mean of ``vectors`` (already checked by
    ``mechanism.check_inputs``)."""
    fields = _fields(dataset_id, plan, clip_norm, centre_kind, mode, name, base_model_id)
    digest = request_key(vectors, center=center, basis_sha256=basis_sha256, **fields)
    return Request(
        digest=digest, budget_epsilon=budget_epsilon, budget_delta=budget_delta, **fields
    )


def training_request(
    request: Mapping[str, Any],
    *,
    dataset_id: str,
    plan: PrivacyPlan,
    clip_norm: float,
    name: str,
    centre_kind: str = "initializer",
    mode: str = "dpsgd",
    base_model_id: str = "",
    budget_epsilon: float | None = None,
    budget_delta: float | None = None,
) -> Request:
    """The request for a train-then-release run (DP-SGD). ``request`` names, as JSON values,
    everything the result depends on besides the images (config, model fingerprint);
    ``clip_norm`` is the per-example gradient bound."""
    if not isinstance(request, Mapping):
        raise DpaggError(f"request={request!r} must be a mapping (a dict of JSON values).")
    check_ids(dataset_id, "release", name=name)
    fields = _fields(dataset_id, plan, clip_norm, centre_kind, mode, name, base_model_id)
    digest = charge_key(request=request, **fields)
    return Request(
        digest=digest, budget_epsilon=budget_epsilon, budget_delta=budget_delta, **fields
    )


def inputs_request(
    inputs: Mapping[str, Any],
    *,
    dataset_id: str,
    plan: PrivacyPlan,
    clip_norm: float,
    center: np.ndarray | None,
    centre_kind: str,
    mode: str,
    name: str,
    base_model_id: str = "",
    basis_sha256: str | None = None,
    budget_epsilon: float | None = None,
    budget_delta: float | None = None,
) -> Request:
    """The request for one DP mean of per-image embeddings that the caller TRAINS from the
    images, keyed by what the user asked (issue 19 item 2), not by the bits training produced:
    the image set (``dataset_id``), ``inputs`` (JSON values naming everything the training
    depends on: the TI configuration with its seed and a digest of the model's weights), the
    plan, C, the public centre, the mode, the basis and the name. A re-run of the same request
    is answered from the ledger even when training is not bit-reproducible (GPUs), so it never
    spends twice, and it need not train at all. ``mechanism.CLIP_MODES`` only (one call)."""
    if not isinstance(inputs, Mapping):
        raise DpaggError(f"inputs={inputs!r} must be a mapping of JSON values.")
    if mode not in mechanism.CLIP_MODES:
        raise DpaggError(f"mode={mode!r} is invalid: use one of {mechanism.CLIP_MODES}.")
    centre = (
        None
        if center is None
        else hashlib.sha256(_as_float64(center).astype("<f8").tobytes()).hexdigest()
    )
    keyed = {
        "kind": "dpagg-release-by-inputs/1",
        "inputs": dict(inputs),
        "centre_sha256": centre,
        "basis_sha256": basis_sha256,
    }
    return training_request(
        keyed,
        dataset_id=dataset_id,
        plan=plan,
        clip_norm=clip_norm,
        name=name,
        centre_kind=centre_kind,
        mode=mode,
        base_model_id=base_model_id,
        budget_epsilon=budget_epsilon,
        budget_delta=budget_delta,
    )


def _fields(
    dataset_id: str,
    plan: PrivacyPlan,
    clip_norm: float,
    centre_kind: str,
    mode: str,
    name: str,
    base_model_id: str,
) -> dict[str, Any]:
    """The request fields both key functions and :class:`Request` share."""
    return {
        "dataset_id": dataset_id,
        "plan": plan,
        "clip_norm": float(clip_norm),
        "centre_kind": centre_kind,
        "mode": mode,
        "name": name,
        "base_model_id": base_model_id,
    }


def check_ids(dataset_id: Any, who: str, *, name: Any = "x") -> None:
    if not isinstance(dataset_id, str) or not dataset_id:
        raise DpaggError(f"{who}: dataset_id={dataset_id!r} is invalid: give a non-empty string.")
    if not isinstance(name, str) or not name:
        raise DpaggError(f"{who}: name={name!r} is invalid: give a non-empty string.")


def check_budget_value(epsilon: float | None, delta: float | None, who: str) -> None:
    if epsilon is not None and not (math.isfinite(epsilon) and epsilon > 0):
        raise DpaggError(f"{who} epsilon={epsilon!r} is invalid: give a finite number > 0.")
    if delta is not None and not (math.isfinite(delta) and 0 <= delta < 1):
        raise DpaggError(f"{who} delta={delta!r} is invalid: give a number in [0, 1).")
