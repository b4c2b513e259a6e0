"""The privacy ledger: a per-dataset budget and every DP release, in one SQLite file.

Why a ledger (docs/privacy.md invariant 5): the privacy guarantee covers *everything* released about
a dataset, so every release is recorded before its result leaves the mechanism, over-budget requests
are refused before any noise is drawn, and re-running an identical request returns the stored
release (post-processing of a released value is free, Dwork & Roth 2014, Prop. 2.1) instead of
drawing fresh noise, which would spend budget again.

One primitive, reserve -> compute -> complete, for every mechanism (DPAgg, CLIP embeddings,
DP-SGD; CLI, ComfyUI nodes, WebUI)::

    with ledger.reserve(request) as r:      # spend committed, or the recorded answer found
        if r.reused:
            return r.result
        release = mechanism.dp_mean(...)    # or a DP-SGD run: the first noise is drawn here
        return r.complete(release.vector, release.record)

* :meth:`Ledger.reserve`, ONE ``BEGIN IMMEDIATE`` transaction before any noise exists: an
  identical request (same :class:`~dpagg_core.privacy.request_keys.Request` digest) whose result is
  stored is returned (``reused``, nothing spent); otherwise the composed spend of recorded + this
  request is checked against the budget (BudgetExceeded, nothing written) and a row WITHOUT a result
  is inserted and COMMITTED. From the commit on the spend counts, whatever happens to the
  computation: "spend committed before the first noise draw" holds because nothing but
  :meth:`Reservation.complete` can store a result, and only a committed reservation has one.
* :meth:`Reservation.complete` stores the released vector (rounded to the published float32
  precision) and its public record in that row. It spends nothing.

A computation that dies between the two (crash, kill -9, Interrupt) leaves an incomplete row: its
spend stays recorded (the noise may have been drawn and seen), and re-running the identical request
is NOT answered from it (there is nothing to return): it is charged again, as a new attempt whose
row key is the request key suffixed ``#2``, ``#3``, ... Concurrent identical runs are likewise each
charged. No noise is drawn while the write lock is held, so a long DP-SGD run blocks no one.

The DP mean of given vectors under this primitive is ``dpagg_core.aggregate.release.
release_vectors`` (the ledger draws nothing itself and imports nothing above the privacy layer).

What "spent" means (composition) is in ``dpagg_core.privacy.composition``; how a request is
identified in ``dpagg_core.privacy.request_keys``; the per-picture spend and admission in
``dpagg_core.privacy.accounts``; the pictures of a set (registration, near copies, private
pictures) in ``dpagg_core.privacy.ledger_pictures``; the SQLite file in
``dpagg_core.privacy.ledger_store``.

Why this module stays whole (over the ~600 lines the package aims at): what is left is the
:class:`Ledger` itself, whose methods each open the transaction their invariant needs - the
reserve primitive (identical-request lookup, admission, the committed reservation) and its
completion, the budget's status and setting, and the refusal that names what fits. Read together
they show that no result is stored without a committed spend and that every refusal happens before
any noise (invariant 5); splitting them would spread one transaction discipline over several
files. Everything that is not a transaction of the ledger lives in the modules above.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from dpagg_core.errors import BudgetExceeded, DpaggError
from dpagg_core.paths import default_ledger_path, resolve_path
from dpagg_core.privacy import ledger_pictures as pictures
from dpagg_core.privacy import mechanism
from dpagg_core.privacy.accounts import (
    Admission,
    Refusal,
    SetAccount,
    Spends,
    admit,
    largest_epsilon,
    set_account,
    worst,
)
from dpagg_core.privacy.calibration import at_epsilon
from dpagg_core.privacy.composition import (
    CHARGE_MODES,
    Spend,
    check_plan_cost,
    fits,
)
from dpagg_core.privacy.identity import dataset_id_for
from dpagg_core.privacy.ledger_store import (
    APPLICATION_ID,
    COLUMNS,
    FILES_TABLE,
    KEY_BYTES,
    SCHEMA_VERSION,
    LedgerStore,
    make_release,
    now,
    read_transaction,
    row_dict,
    write_transaction,
)
from dpagg_core.privacy.plan import PrivacyPlan, checked_plan
from dpagg_core.privacy.plan_text import composition_words
from dpagg_core.privacy.request_keys import (
    Request,
    check_budget_value,
    check_ids,
    request_mac,
)

__all__ = [
    "APPLICATION_ID",
    "KEY_BYTES",
    "SCHEMA_VERSION",
    "BudgetState",
    "Ledger",
    "LedgerRelease",
    "Request",
    "Reservation",
    "identity_key",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
MODES = mechanism.CLIP_MODES

# Test hook: called inside reserve's transaction right before COMMIT (tests widen the race window
# between the budget check and the commit with it). Never set in production.
_before_commit_hook: Callable[[], None] | None = None


@dataclass(frozen=True, kw_only=True)
class BudgetState:
    """A dataset's composed spend and its budget (after the request it comes with)."""

    spent_epsilon: float
    spent_delta: float
    budget_epsilon: float
    budget_delta: float
    composition: str  # "none" | "basic" | "pld"

    @property
    def remaining_epsilon(self) -> float:
        return max(0.0, self.budget_epsilon - self.spent_epsilon)

    @classmethod
    def of(cls, spend: Spend, budget: tuple[float, float]) -> BudgetState:
        return cls(
            spent_epsilon=spend.epsilon,
            spent_delta=spend.delta,
            budget_epsilon=budget[0],
            budget_delta=budget[1],
            composition=spend.composition,
        )

    def budget_state(self) -> BudgetState:
        """This state alone (drops a subclass's other fields)."""
        return BudgetState(
            spent_epsilon=self.spent_epsilon,
            spent_delta=self.spent_delta,
            budget_epsilon=self.budget_epsilon,
            budget_delta=self.budget_delta,
            composition=self.composition,
        )


@dataclass(frozen=True, kw_only=True)
class LedgerRelease(BudgetState):
    """A recorded release: the released value, whether it was answered from the ledger
    (``reused``: nothing spent), its row id, and the dataset's budget state after it."""

    release: mechanism.Release
    reused: bool
    release_id: int


class Reservation:
    """The answer of :meth:`Ledger.reserve` (or of its dry run :meth:`Ledger.check_request`).

    ``reused``: an identical request is complete in the ledger; ``result`` is its stored release
    and nothing was (or would be) spent. Otherwise ``release_id`` is the committed row (0 in a dry
    run: nothing written), to be filled once with :meth:`complete`; ``attempt`` counts charges of
    this request (2, 3, ... after failed runs); ``state`` is the dataset's budget state after it.
    """

    def __init__(
        self,
        ledger: Ledger,
        request: Request,
        *,
        release_id: int,
        attempt: int,
        state: BudgetState,
        result: LedgerRelease | None = None,
        token: str = "",
    ) -> None:
        self.ledger = ledger
        self._token = token
        self.request = request
        self.release_id = release_id
        self.attempt = attempt
        self.state = state
        self.result = result
        self._completed: LedgerRelease | None = None

    @property
    def reused(self) -> bool:
        return self.result is not None

    def complete(self, vector: Any, record: Mapping[str, str]) -> LedgerRelease:
        """Store the result of this reservation: ``vector`` (any shape; rounded to the published
        float32 precision, ``mechanism.to_published_precision``) and its public privacy
        ``record``. Spends nothing (the reservation did). Once per reservation."""
        if self.reused:
            raise DpaggError(
                "complete: this request was answered from the ledger (reused); nothing to store."
            )
        if self.release_id == 0:
            raise DpaggError("complete: a dry run (check_request) reserves nothing to complete.")
        if self._completed is not None:
            raise DpaggError(f"complete: release {self.release_id} is already completed.")
        self._completed = self.ledger._complete(self.release_id, self._token, vector, record)
        return self._completed

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.reused or self.release_id == 0 or self._completed is not None:
            return
        log.warning(
            "privacy ledger %s: release %d of dataset %s was charged but no result was stored "
            "(%s); its spend stays recorded and an identical re-run is charged again",
            self.ledger.path,
            self.release_id,
            self.request.dataset_id,
            "interrupted by " + type(exc).__name__ if exc is not None else "not completed",
        )


class _Refused(Exception):
    """A refusal found inside a transaction; worded (with what would fit) after it ends, so no
    accountant search runs while the ledger's write lock is held."""

    def __init__(self, dataset_id: str, plan: PrivacyPlan, why: Refusal, mode: str,
                 budget_epsilon: float | None, budget_delta: float | None) -> None:  # fmt: skip
        super().__init__(why.kind)
        self.dataset_id, self.plan, self.why, self.mode = dataset_id, plan, why, mode
        self.budget_epsilon, self.budget_delta = budget_epsilon, budget_delta


def _owner_digest(token: str) -> str:
    """What a row stores of its reservation's secret token (the token itself stays in memory)."""
    return hashlib.sha256(b"dpagg-reservation/1\x00" + token.encode()).hexdigest()


def identity_key(ledger_path: str | os.PathLike[str] | None = None) -> bytes:
    """The identity key of the ledger at ``ledger_path`` (default ``paths.default_ledger_path``),
    creating the ledger if needed. See :meth:`Ledger.identity_key`."""
    return Ledger(ledger_path).identity_key()


class Ledger:
    """Per-dataset privacy budgets and every release, in one SQLite file.

    ``path`` defaults to ``paths.default_ledger_path()`` (env ``DPAGG_LEDGER``, else the user data
    dir); parent folders are created on first use. ``timeout`` bounds the wait for another process
    holding the write lock (SQLite busy timeout), after which :class:`LedgerError` is raised.
    Each operation opens its own connection, so a ``Ledger`` can be shared across threads and
    pickled into worker processes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        raise_hint: Callable[[Path, str], str] | None = None,
    ) -> None:
        self.path = resolve_path(path) if path is not None else default_ledger_path()
        self.timeout = float(timeout)
        if raise_hint is not None:
            self.raise_hint = raise_hint
        self._store = LedgerStore(self.path, self.timeout)

    #: How a user raises a budget where this ledger's messages are shown: ``None`` names the
    #: ``dpagg`` command; a front end passes its own as ``Ledger(path, raise_hint=...)`` (ComfyUI:
    #: the Privacy Ledger node and the exact ``python -m dpagg_core.cli`` command; a module-level
    #: function, so a Ledger still pickles).
    raise_hint: Callable[[Path, str], str] | None = None

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r})"

    def how_to_raise(self, dataset_id: str) -> str:
        """The exact way to raise ``dataset_id``'s budget, for "Fix:" texts."""
        if self.raise_hint is not None:
            return self.raise_hint(self.path, dataset_id)
        return (
            f"`dpagg ledger set-budget --ledger {self.path} --dataset {dataset_id} --epsilon E "
            "--delta D`"
        )

    # ---- identity ----------------------------------------------------------------------------

    def identity_key(self) -> bytes:
        """The ledger's secret key (32 bytes), creating the ledger if needed.

        Every value the ledger stores or the caller derives from private data is keyed by it:
        dataset ids (``images.dataset_id_for``), request keys, the authentication tag of private
        per-image files. Because it lives in the ledger file, every process using this ledger
        (CLI, ComfyUI, WebUI, other users or data dirs) sees the same pictures as the same
        dataset (docs/privacy.md invariant 7). It is never released, logged or written anywhere
        else.
        """
        with self._store.connect() as con:
            return self._store.secret(con)

    def dataset_id(self, digests: Any) -> str:
        """Id of the image set with per-image ``digests`` under this ledger's key."""
        return dataset_id_for(digests, key=self.identity_key())

    def request_mac(self, digest: str) -> str:
        """The stored key of a request whose unkeyed digest is ``digest`` (``request_keys``)."""
        return request_mac(self.identity_key(), digest)

    # ---- reads -------------------------------------------------------------------------------

    # ---- budget -----------------------------------------------------------------------------

    def status(self, dataset_id: str) -> dict[str, Any]:
        """Budget, composed spend, remaining budget and releases of ``dataset_id``'s pictures.

        ``{"dataset_id", "budget": {"epsilon","delta"} | None, "spent": {"epsilon","delta"},
        "remaining": {"epsilon","delta"} | None, "releases": int, "incomplete": int,
        "composition": str, "pictures": int, "shared": bool}``. The budget lives with each
        picture (``accounts``); a set shows its worst picture: the one with the least budget left
        (``pictures`` of them share that state; ``shared``: its spend includes releases of other,
        overlapping sets). ``releases`` counts the recorded rows charged to any of its pictures
        (a DP-SGD run is one row); ``incomplete`` those whose result was never stored (spent,
        nothing to return). Under PLD composition the spend is reported at the budget's delta,
        so remaining delta is 0 and only epsilon is left to spend.
        """
        with self._store.connect() as con, read_transaction(con):
            account = set_account(con, dataset_id)
            state = worst(account, Spends(con))
            ids = sorted(account.release_ids)
            rows, complete = con.execute(
                "SELECT count(*), count(vector) FROM releases "
                "WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(ids),),
            ).fetchone()
        spend, budget = state.spend, state.budget
        out: dict[str, Any] = {
            "dataset_id": dataset_id,
            "budget": None,
            "spent": {"epsilon": spend.epsilon, "delta": spend.delta},
            "remaining": None,
            "releases": int(rows),
            "incomplete": int(rows) - int(complete),
            "composition": spend.composition,
            "pictures": state.pictures,
            "shared": state.shared,
        }
        if budget is not None:
            out["budget"] = {"epsilon": budget[0], "delta": budget[1]}
            out["remaining"] = {
                "epsilon": max(0.0, budget[0] - spend.epsilon),
                "delta": max(0.0, budget[1] - spend.delta),
            }
        return out

    def _refusal(self, refused: _Refused) -> BudgetExceeded:
        dataset_id, plan, why = refused.dataset_id, refused.plan, refused.why
        raise_it = f"raise the budget deliberately with {self.how_to_raise(dataset_id)}"
        info = why.info
        if why.kind == "raise":
            label, req, cur = info["label"], info["requested"], info["recorded"]
            return BudgetExceeded(
                f"budget_{label}={req:g} is above the recorded budget {label} {cur:g} of "
                f"pictures of image set {dataset_id!r} in {self.path}. A budget is never raised "
                f"implicitly. Fix: {raise_it}, or set budget_{label} to 0 (keep the recorded "
                "budget)."
            )
        spent, after, budget = info["spent"], info["after"], info["budget"]
        assert isinstance(spent, Spend) and isinstance(after, Spend) and isinstance(budget, tuple)
        best = self._fitting_epsilon(refused)
        if best is None:  # no epsilon, however small, fits: only a larger budget helps
            fix = (
                f"no release that includes these pictures fits any more, whatever its epsilon "
                f"(their budget is used up). Fix: {raise_it}, or release "
                "nothing more that includes these pictures."
            )
        elif math.isnan(best):
            fix = f"Fix: use a larger noise (smaller epsilon), or {raise_it}."
        else:
            fix = (
                f"The largest epsilon that fits now for a release like this one (n={plan.n}, "
                f"delta={plan.delta:.3g}, {plan.sampling} sampling; same accountant) is about "
                f"{best:.3g}. Fix: release at epsilon <= {best:.3g}, or {raise_it}."
            )
        who = (
            f"image set {dataset_id!r}"
            if info["total"] == 1
            else f"{info['pictures']} of the {info['total']} pictures of image set {dataset_id!r}"
        )
        shared = (
            " (they also took part in releases of other, overlapping image sets: the budget "
            "protects each picture, whichever set it was released with)"
            if info.get("shared")
            else ""
        )
        return BudgetExceeded(
            f"privacy budget of {who} would be exceeded{shared}: spent "
            f"epsilon={spent.epsilon:.6g}, delta={spent.delta:.3g} "
            f"({composition_words(spent.composition)}); budget epsilon={budget[0]:.6g}, "
            f"delta={budget[1]:.3g}; requested "
            f"epsilon={plan.epsilon:.6g}, delta={plan.delta:.3g} (total would be "
            f"epsilon={after.epsilon:.6g}, delta={after.delta:.3g}). No noise was drawn, nothing "
            f"was spent; {fix}"
        )

    def _check_locked(
        self,
        con: Any,
        dataset_id: str,
        plan: PrivacyPlan,
        budget_epsilon: float | None,
        budget_delta: float | None,
        mode: str = "clip",
    ) -> tuple[SetAccount, Admission]:
        account = set_account(con, dataset_id)
        try:
            admission = admit(account, Spends(con), plan, mode, budget_epsilon, budget_delta)
        except Refusal as why:
            raise _Refused(dataset_id, plan, why, mode, budget_epsilon, budget_delta) from None
        return account, admission

    def _fitting_epsilon(self, refused: _Refused) -> float | None:
        """The largest epsilon that fits now for a release like the refused one (same n,
        delta, sampling), by the same accountant and the same search as
        :meth:`largest_next_epsilon` (so the refusal and the nodes' "the next release can be at
        most" name the same number); None if none does. Own read transaction."""
        caps = self._epsilon_caps(refused.dataset_id, refused.budget_epsilon)
        upper = min(caps) if caps else refused.plan.epsilon
        r = refused
        return self._largest_epsilon(
            r.dataset_id, r.plan, r.mode, r.budget_epsilon, r.budget_delta, upper
        )

    def _epsilon_caps(self, dataset_id: str, budget_epsilon: float | None) -> list[float]:
        budget = self.status(dataset_id)["budget"]
        return [c for c in (budget and budget["epsilon"], budget_epsilon) if c]

    def _largest_epsilon(
        self,
        dataset_id: str,
        plan: PrivacyPlan,
        mode: str,
        budget_epsilon: float | None,
        budget_delta: float | None,
        upper: float,
    ) -> float | None:
        def recalibrate(eps: float) -> PrivacyPlan:
            return at_epsilon(plan, eps)

        try:
            with self._store.connect() as con, read_transaction(con):
                account = set_account(con, dataset_id)
                return largest_epsilon(account, Spends(con), plan, mode, budget_epsilon,
                                       budget_delta, recalibrate, upper=upper)  # fmt: skip
        except DpaggError:  # a plan the calibrator cannot reproduce: say nothing about it
            return float("nan")

    def largest_next_epsilon(
        self,
        dataset_id: str,
        plan: PrivacyPlan,
        budget_epsilon: float | None = None,
        budget_delta: float | None = None,
        *,
        mode: str = "clip",
    ) -> float | None:
        """What the next release can be: the largest epsilon that a release like ``plan`` (same
        n, delta, sampling, m/q, releases; noise calibrated by the same accountant) may have and
        still be admitted now, searched up to the budget's epsilon - the number a refusal names
        as "the largest epsilon that fits". None when the image set has no budget yet (and no
        ``budget_epsilon`` sets one) or when no epsilon fits; NaN when the plan cannot be
        re-calibrated. Draws nothing, writes nothing."""
        check_ids(dataset_id, "check")
        caps = self._epsilon_caps(dataset_id, budget_epsilon)
        if not caps:
            return None
        return self._largest_epsilon(dataset_id, plan, mode, budget_epsilon, budget_delta,
                                     min(caps))  # fmt: skip

    def check(
        self,
        dataset_id: str,
        plan: PrivacyPlan,
        budget_epsilon: float | None = None,
        budget_delta: float | None = None,
        *,
        mode: str = "clip",
    ) -> dict[str, Any]:
        """Dry run of a release of ``plan``: raises BudgetExceeded if it would be refused.

        Returns ``{"budget": {...}, "spent_after": {...}, "composition": str}``. Draws nothing and
        writes nothing (a concurrent release may still take the budget first). ``mode='dpsgd'``
        checks a DP-SGD reservation (all ``plan.releases`` calls at once) instead of one call.
        """
        check_ids(dataset_id, "check")
        if mode not in MODES + CHARGE_MODES:
            raise DpaggError(f"mode={mode!r} is invalid: use one of {MODES + CHARGE_MODES}.")
        checked_plan(plan)
        check_plan_cost(plan)
        check_budget_value(budget_epsilon, budget_delta, "budget")
        try:
            with self._store.connect() as con, read_transaction(con):
                _, admission = self._check_locked(
                    con, dataset_id, plan, budget_epsilon, budget_delta, mode
                )
        except _Refused as refused:
            raise self._refusal(refused) from None
        after = admission.after
        budget = after.budget or admission.set_budget
        return {
            "budget": {"epsilon": budget[0], "delta": budget[1]},
            "spent_after": {"epsilon": after.spend.epsilon, "delta": after.spend.delta},
            "composition": after.spend.composition,
        }

    def adopt_dataset(self, old_id: str, new_id: str) -> bool:
        """Move everything recorded for ``old_id`` to ``new_id`` (the same pictures under a new
        identification rule, e.g. the canonical decode that replaced dpagg <= 0.2's); True if
        anything moved.

        One write transaction. The old set's charge unit (``set:<old_id>``, a set whose pictures
        were never registered) becomes ``set:<new_id>``'s, keeping the smaller budget where both
        exist (budgets only ever get stricter this way); registering ``new_id``'s pictures then
        charges them with it (:meth:`register_set`). Request keys are not rewritten, so an
        identical re-run under the new id is charged again (conservative). A no-op when
        ``old_id`` is unknown or equals ``new_id``.
        """
        check_ids(old_id, "adopt_dataset")
        check_ids(new_id, "adopt_dataset")
        if old_id == new_id:
            return False
        with self._store.connect() as con:
            if not pictures.adopt(self._store, con, old_id, new_id):
                return False
        log.warning(
            "privacy ledger %s: the budget of an image set recorded under dpagg's old image "
            "decode now applies to its new id %s",
            self.path,
            new_id,
        )
        return True

    # ---- pictures ----------------------------------------------------------------------------

    def register_set(
        self,
        dataset_id: str,
        image_ids: Sequence[str],
        looks: Sequence[str] = (),
        *,
        candidates: Mapping[str, Sequence[str]] | None = None,
    ) -> list[int]:
        """Record which pictures make up ``dataset_id`` (keyed ids, ``identity.image_ids_for``),
        so that every release of it is charged to each picture (invariant 9). Returns the
        indices of pictures that are new to the ledger but whose keyed perceptual hash
        (``looks``, same order) matches a picture already charged with a release: probably a
        re-encoded or resized copy, which the exact id cannot recognise (the caller warns).

        A set recorded before its pictures were known (schema 2, or an id passed by a trusted
        caller) is charged as one unit ``set:<dataset_id>``: registering it attaches that unit's
        releases and budget to each of its pictures (a picture's budget becomes the smaller of
        its own and the set's), so no recorded spend is lost. ``candidates`` (dataset id ->
        image ids, e.g. the set minus one picture) are attached the same way where such a unit
        exists, and ignored otherwise. Writes only when something is new.
        """
        check_ids(dataset_id, "register_set")
        ids = list(dict.fromkeys(image_ids))
        if not ids or not all(isinstance(i, str) and i for i in ids):
            raise DpaggError("register_set: image_ids must be non-empty strings (image_ids_for).")
        sets = {dataset_id: ids}
        for cid, cids in (candidates or {}).items():
            sets.setdefault(cid, list(dict.fromkeys(cids)))
        look_of = dict(zip(image_ids, looks, strict=False)) if looks else {}
        with self._store.connect() as con:
            for sid in pictures.register(self._store, con, dataset_id, sets, look_of):
                log.info(
                    "privacy ledger %s: the recorded releases of image set %s now count for each "
                    "of its %d pictures",
                    self.path,
                    sid,
                    len(sets[sid]),
                )
            return pictures.near_copies(self._store, con, image_ids, looks)

    def private_pictures(self, image_ids: Sequence[str]) -> list[int]:
        """Indices of ``image_ids`` the ledger knows as private: a picture of a loaded private set
        or charged with a release. Public inputs refuse them (invariant 8). Reads only."""
        with self._store.connect() as con:
            return pictures.private_picture_indices(con, image_ids)

    def private_looks(self, looks: Sequence[str]) -> list[int]:
        """Indices of keyed perceptual hashes (``identity.look_id_for``) that match a private
        picture's: probably a resized or re-encoded copy of it. Reads only."""
        with self._store.connect() as con:
            return pictures.private_look_indices(con, looks)

    def has_unregistered_sets(self) -> bool:
        """Whether any recorded set is still charged as a whole (its pictures never loaded
        since the upgrade to per-picture accounting): then loaders also offer near subsets
        (``candidates`` of :meth:`register_set`)."""
        with self._store.connect() as con:
            return pictures.any_unregistered_set(con)

    def set_budget(self, dataset_id: str, epsilon: float, delta: float) -> dict[str, Any]:
        """Set (raise or lower) the budget of every picture of ``dataset_id``; returns the new
        :meth:`status`.

        The budget lives with each picture, so this also changes what overlapping sets that
        share these pictures can spend. Lowering it below what any of its pictures already spent
        (composed at the new delta) is refused with BudgetExceeded: spent privacy cannot be
        taken back.
        """
        check_ids(dataset_id, "set_budget")
        check_budget_value(epsilon, delta, "set_budget")
        epsilon, delta = float(epsilon), float(delta)
        with self._store.connect() as con, write_transaction(con):
            account = set_account(con, dataset_id)
            spends = Spends(con)
            for group in account.groups:
                spent = spends.spend(group, delta)
                if not fits(spent, epsilon, delta):
                    raise BudgetExceeded(
                        f"cannot set the budget of image set {dataset_id!r} to "
                        f"epsilon={epsilon:g}, delta={delta:g}: {len(group.units)} of its "
                        f"pictures already spent epsilon={spent.epsilon:.6g}, "
                        f"delta={spent.delta:.3g} ({spent.composition} composition at "
                        f"delta={delta:g}) in {self.path}. Spent privacy cannot be taken back. "
                        "Fix: choose a budget at least the spent amount."
                    )
            for unit in account.units:
                self._store.upsert_unit_budget(con, unit, epsilon, delta)
            self._store.upsert_budget(con, dataset_id, epsilon, delta)
        return self.status(dataset_id)

    # ---- the one primitive: reserve -> compute -> complete -------------------------------------

    def _state_locked(self, con: Any, dataset_id: str) -> BudgetState:
        state = worst(set_account(con, dataset_id), Spends(con))
        return BudgetState.of(state.spend, state.budget or (0.0, 0.0))

    def _stored_locked(self, con: Any, request: Request) -> tuple[str, int, LedgerRelease | None]:
        """(stored key, earlier attempts, stored result) of ``request``."""
        key = request_mac(self._store.secret(con), request.digest)
        # Every earlier attempt of this request: the key itself, then key#2, key#3, ...
        rows = con.execute(
            "SELECT id, vector, record, item_shape FROM releases WHERE request_key = ? OR "
            "substr(request_key, 1, ?) = ? ORDER BY id",
            (key, len(key) + 1, key + "#"),
        ).fetchall()
        done = [r for r in rows if r[1] is not None]
        if not done:
            return key, len(rows), None
        row = done[0]
        result = LedgerRelease(
            **vars(self._state_locked(con, request.dataset_id)),
            release=make_release(row[1], row[2], row[3]),
            reused=True,
            release_id=int(row[0]),
        )
        return key, len(rows), result

    def stored_result(self, request: Request) -> LedgerRelease | None:
        """The recorded result of an identical completed request, or None. Reads only."""
        with self._store.connect() as con, read_transaction(con):
            return self._stored_locked(con, request)[2]

    def _lookup_locked(
        self, con: Any, request: Request, *, write: bool, owner: str = ""
    ) -> tuple[int, int, BudgetState, LedgerRelease | None]:
        """(release_id, attempt, state, stored result) for ``request``, inside the caller's
        transaction: the stored result of an identical completed request, else the per-picture
        budget check (BudgetExceeded) and, if ``write``, the new row without a result, charged to
        each picture of the set (``owner``: the digest of the reservation's secret token)."""
        key, attempts, result = self._stored_locked(con, request)
        if result is not None:  # identical request, completed: post-processing of it is free
            return result.release_id, attempts, result.budget_state(), result
        attempt = attempts + 1  # incomplete attempts are spent, never answered from
        account, admission = self._check_locked(
            con,
            request.dataset_id,
            request.plan,
            request.budget_epsilon,
            request.budget_delta,
            request.mode,
        )
        release_id = 0
        if write:
            for unit, budget in admission.new_budgets.items():  # first use sets the budget
                self._store.upsert_unit_budget(con, unit, *budget)
            if self._store.budget(con, request.dataset_id) is None:
                self._store.upsert_budget(con, request.dataset_id, *admission.set_budget)
            cur = con.execute(
                "INSERT INTO releases (dataset_id, request_key, name, created, plan, epsilon, "
                "delta, clip_norm, centre_kind, mode, base_model_id, item_shape, owner) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    request.dataset_id,
                    key if attempt == 1 else f"{key}#{attempt}",
                    request.name,
                    now(),
                    json.dumps(request.plan.to_dict(), sort_keys=True),
                    float(request.plan.epsilon),
                    float(request.plan.delta),
                    float(request.clip_norm),
                    request.centre_kind,
                    request.mode,
                    request.base_model_id,
                    "null",  # set by complete()
                    owner,
                ),
            )
            release_id = int(cur.lastrowid)
            con.executemany(
                "INSERT INTO release_images (release_id, image_id) VALUES (?, ?)",
                [(release_id, unit) for unit in account.units],
            )
        after = admission.after
        state = BudgetState.of(after.spend, after.budget or admission.set_budget)
        return release_id, attempt, state, None

    def reserve(self, request: Request) -> Reservation:
        """Commit the spend of ``request`` BEFORE any noise exists (module docstring).

        In ONE ``BEGIN IMMEDIATE`` transaction: an identical request whose result is stored is
        returned (``reused``, nothing spent); for every picture of the set, the composed spend of
        the recorded calls charged to it plus this request's ``request.calls`` is checked against
        its budget (BudgetExceeded, nothing written); a row without a result is inserted, charged
        to each picture, and COMMITTED. Use the answer as a context manager and store the result
        with :meth:`Reservation.complete` (only this reservation can: it holds the row's secret
        token).
        """
        if not isinstance(request, Request):
            raise DpaggError(
                f"reserve: {request!r} is not a Request: build one with "
                "request_keys.aggregate_request or request_keys.training_request."
            )
        token = secrets.token_hex(32)
        try:
            with self._store.connect() as con, write_transaction(con):
                release_id, attempt, state, result = self._lookup_locked(
                    con, request, write=True, owner=_owner_digest(token)
                )
                if result is None and _before_commit_hook is not None:
                    _before_commit_hook()
        except _Refused as refused:  # worded after the write lock is released
            raise self._refusal(refused) from None
        return Reservation(
            self,
            request,
            release_id=release_id,
            attempt=attempt,
            state=state,
            result=result,
            token=token if result is None else "",
        )

    def check_request(self, request: Request) -> Reservation:
        """Dry run of :meth:`reserve`: the stored result of an identical completed request
        (``reused``), or the budget state a reservation would leave (``release_id`` 0), or
        BudgetExceeded. Writes nothing; lets a caller refuse or reuse before a long training run
        (a concurrent release may still take the budget first)."""
        try:
            with self._store.connect() as con, read_transaction(con):
                release_id, attempt, state, result = self._lookup_locked(con, request, write=False)
        except _Refused as refused:
            raise self._refusal(refused) from None
        return Reservation(
            self, request, release_id=release_id, attempt=attempt, state=state, result=result
        )

    def _complete(
        self, release_id: int, token: str, vector: Any, record: Mapping[str, str]
    ) -> LedgerRelease:
        """Fill the reserved row ``release_id`` (:meth:`Reservation.complete`) if ``token`` is
        the secret of the reservation that made it. Anyone else (another process finding an
        orphaned row of a process that died) is refused: an orphan stays spent and is never an
        answer, since its noise may have been drawn and seen."""
        vec = np.ascontiguousarray(np.asarray(vector, dtype=np.float64))
        if vec.size and np.isfinite(vec).all():
            vec = mechanism.to_published_precision(vec)
        if vec.size == 0 or not np.isfinite(vec).all():
            raise DpaggError("complete: vector is empty or holds NaN/inf; nothing was stored.")
        if not isinstance(record, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in record.items()
        ):
            raise DpaggError("complete: record must map strings to strings (the privacy record).")
        rid = int(release_id)
        with self._store.connect() as con, write_transaction(con):
            row = con.execute(
                "SELECT dataset_id, vector, owner FROM releases WHERE id = ?", (rid,)
            ).fetchone()
            if row is None or row[1] is not None:
                raise DpaggError(
                    f"complete: release {rid} in {self.path} is not an open reservation; each "
                    "reservation is completed once. Nothing was changed."
                )
            if not row[2] or not hmac.compare_digest(str(row[2]), _owner_digest(str(token))):
                raise DpaggError(
                    f"complete: release {rid} in {self.path} was reserved by another "
                    "reservation (or a process that died); only the reservation that charged it "
                    "may store its result. It stays spent and is never an answer. Nothing was "
                    "changed."
                )
            con.execute(
                "UPDATE releases SET vector = ?, record = ?, item_shape = ? WHERE id = ?",
                (
                    vec.astype("<f8").tobytes(),
                    json.dumps(dict(record), sort_keys=True),
                    json.dumps([int(d) for d in vec.shape]),
                    rid,
                ),
            )
            state = self._state_locked(con, row[0])
        return LedgerRelease(
            **vars(state),
            release=mechanism.Release(vector=vec.copy(), record=dict(record)),
            reused=False,
            release_id=rid,
        )

    def note_file(self, release_id: int, file_name: str) -> None:
        """Remember the file name a release was written under (``mystyle-2`` for a request named
        ``mystyle``), for ``dpagg ledger show`` and the Privacy Ledger node. Display only: the
        request key keeps the requested name. The table is created on first use (a ledger
        without it still reads, in this and older dpagg versions)."""
        if not isinstance(file_name, str) or not file_name:
            raise DpaggError(f"note_file: file_name={file_name!r} is invalid: give a name.")
        with self._store.connect() as con, write_transaction(con):
            con.execute(FILES_TABLE)
            con.execute(
                "INSERT INTO release_files (release_id, file_name, created) VALUES (?, ?, ?)",
                (int(release_id), str(file_name), now()),
            )

    def dataset_ids(self) -> list[str]:
        """Every dataset with a budget or a release (sorted); ids only, nothing private."""
        with self._store.connect() as con:
            rows = con.execute(
                "SELECT dataset_id FROM datasets UNION SELECT dataset_id FROM releases ORDER BY 1"
            ).fetchall()
        return [r[0] for r in rows]

    def list_releases(
        self, dataset_id: str | None = None, *, with_vectors: bool = False
    ) -> list[dict[str, Any]]:
        """Recorded releases (oldest first), of one dataset or all; vectors only if asked."""
        sql = f"SELECT {COLUMNS} FROM releases"
        args: tuple[Any, ...] = ()
        if dataset_id is not None:
            sql += " WHERE dataset_id = ?"
            args = (dataset_id,)
        with self._store.connect() as con:
            rows = con.execute(sql + " ORDER BY id", args).fetchall()
            files = self._store.files(con)
        out = [row_dict(r, with_vectors) for r in rows]
        for r in out:  # the file name(s) actually written (a re-used release may be rewritten)
            r["files"] = files.get(r["id"], [])
        return out

    def get_release(self, release_id: int) -> dict[str, Any]:
        """One recorded release, with its vector (np.float64 [D]) and record.

        A reserved row not yet completed (:meth:`reserve`) has ``vector`` and ``record`` None and
        ``complete`` False."""
        with self._store.connect() as con:
            row = con.execute(
                f"SELECT {COLUMNS} FROM releases WHERE id = ?", (int(release_id),)
            ).fetchone()
        if row is None:
            raise DpaggError(
                f"no release with id {release_id} in ledger {self.path}. Fix: list them with "
                f"`dpagg ledger show`."
            )
        return row_dict(row, True)
