"""The privacy ledger: a per-dataset budget and every DP release, in one SQLite file.

Why a ledger (docs/privacy.md invariant 5): the privacy guarantee covers *everything* released about
a dataset, so every release is recorded before its result leaves the mechanism, over-budget requests
are refused before any noise is drawn, and re-running an identical request returns the stored
release (post-processing of a released value is free, Dwork & Roth 2014, Prop. 2.1) instead of
drawing fresh noise, which would spend budget again.

Storage: the stdlib ``sqlite3`` module, one file (default ``paths.default_ledger_path()``).

* Journal mode: the classic rollback journal (``journal_mode=DELETE``) with
  ``synchronous=FULL``. Both it and WAL are atomic and durable under process kill and power loss
  with FULL sync; the rollback journal is chosen because it keeps the ledger a single file at rest,
  needs no shared-memory ``-shm`` file (WAL does not work on network file systems and cannot be
  read from a read-only directory), and dpagg writes a handful of rows per run, so WAL's
  reader/writer concurrency buys nothing. A process killed mid-transaction leaves a hot journal
  that the next opener rolls back automatically.
* Concurrency: every release runs in ONE ``BEGIN IMMEDIATE`` transaction (idempotency lookup,
  budget check, a first write that proves the file is writable, the noise draw, the final row,
  ``COMMIT``). ``BEGIN IMMEDIATE`` takes the write lock before the budget is read, so two processes
  cannot both see the same remaining budget. Waiting for the lock is bounded by ``busy_timeout``.
* Schema: versioned by ``PRAGMA user_version`` and marked by ``PRAGMA application_id``; created on
  first use inside a write transaction (safe when several processes start at once).

Composition (what "spent" means). A plan states ``(plan.epsilon, plan.delta)`` for
``plan.releases`` calls of the mechanism; calls of one identical plan on a dataset are charged in
blocks of that many (``charged_blocks``; the default ``releases=1`` charges every call). A plan
whose stated epsilon is below the accountant's bound for its noise multiplier is refused
(``accountant.epsilon_for``), so a hand-built plan cannot under-charge. The ledger then takes the
tighter of two sound bounds for all charged blocks, recorded plus new:

1. Basic composition (Dwork, Kenthapadi, McSherry, Mironov, Naor 2006; Dwork & Roth 2014,
   Thm 3.16): ``(sum eps_i, sum delta_i)``. Always available; holds for adaptively chosen plans.
2. Privacy-loss-distribution composition (dp-accounting's ``PLDAccountant``, pessimistic
   discretisation, Meiser & Mohammadi 2018; Koskela et al. 2020; Doroshenko et al. 2022), used only
   when every plan has a ``DpEvent`` (``accountant.dp_events``) and all plans share one neighbouring
   relation: the epsilon of the composed events at the budget's delta, ``(eps_pld, delta_total)``.
   PLD composition is valid for adaptive composition because each release is a fixed mechanism
   given its public plan.

Either bound is a valid (epsilon, delta) guarantee for the composed releases, so a request is
granted if either fits the budget, and the reported spend is the fitting bound with the smaller
epsilon. Comparisons allow a 1e-9 relative slack so that, e.g., three releases of epsilon 0.1 fit a
budget of 0.3 despite floating-point rounding (0.1+0.1+0.1 > 0.3 in binary); the guarantee is then
the budget up to a factor 1 + 1e-9.

Train-then-release mechanisms (DP-SGD, ``dpagg_core.dpsgd``). DP-SGD draws noise in each of its
T steps over minutes or hours, so holding the write lock while it runs would block every other
release. Such a release is recorded in two steps instead:

* :meth:`Ledger.charge`, one ``BEGIN IMMEDIATE`` transaction BEFORE any noise is drawn: the
  idempotency lookup (an identical request whose row is complete returns the stored vector,
  ``reused=True``, nothing spent), the budget check (BudgetExceeded, nothing written), and a row
  WITHOUT a vector (``mode='dpsgd'``), committed. From here on the spend counts (invariant 5: a
  failure after noise was drawn still counts as spent).
* :meth:`Ledger.complete` stores the released vector and record in that row afterwards.

A run that fails between the two leaves an incomplete row: its spend stays recorded, and re-running
the identical request is NOT answered from it (there is nothing to return): it is charged again,
as a new attempt whose row key is the request key suffixed ``#2``, ``#3``, ... Concurrent
identical runs are likewise each charged (each draws its own noise). A charged row consumes ALL
``plan.releases`` (= T steps) calls of its plan at once, so it counts as ``plan.releases`` calls in
:func:`charged_blocks`: two identical DP-SGD runs cost two blocks, never one.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from dpagg_core import accountant, mechanism
from dpagg_core.accountant import PrivacyPlan
from dpagg_core.errors import BudgetExceeded, DpaggError, LedgerError
from dpagg_core.paths import default_ledger_path, legacy_install_salt, resolve_path

log = logging.getLogger(__name__)

# Version 2 keeps the identity key inside the ledger and stores request keys as keyed MACs.
SCHEMA_VERSION = 2
KEY_BYTES = 32
APPLICATION_ID = 0x44504147  # "DPAG": marks a dpagg ledger, so a foreign SQLite file is refused.
DEFAULT_TIMEOUT_S = 30.0
REL_TOL = 1e-9
MODES = ("clip", "normalize")
# Modes of rows written by Ledger.charge (train-then-release). Such a row consumes all
# plan.releases calls of its plan (DP-SGD: one call per step).
CHARGE_MODES = ("dpsgd",)

# Test hook: called inside the release transaction after the noise is drawn and the row written,
# right before COMMIT. Tests use it to kill a process at the worst moment. Never set in production.
_before_commit_hook: Callable[[], None] | None = None

# The ledger's identity key (docs/privacy.md, "One identity per ledger"): exactly one row of 32
# CSPRNG bytes, created in the same transaction as the schema, so no reader can see a ledger
# without its key or a partial key.
_KEY_TABLE = """
CREATE TABLE ledger_key (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    secret  BLOB NOT NULL CHECK (typeof(secret) = 'blob' AND length(secret) = 32),
    origin  TEXT NOT NULL,
    created TEXT NOT NULL
);
"""

# Display only (``Ledger.note_file``), created on first use; not part of the schema version.
_FILES_TABLE = (
    "CREATE TABLE IF NOT EXISTS release_files (release_id INTEGER NOT NULL, "
    "file_name TEXT NOT NULL, created TEXT NOT NULL)"
)

_SCHEMA = (
    """
CREATE TABLE datasets (
    dataset_id    TEXT PRIMARY KEY,
    epsilon_total REAL NOT NULL CHECK (epsilon_total > 0),
    delta_total   REAL NOT NULL CHECK (delta_total >= 0 AND delta_total < 1),
    created       TEXT NOT NULL,
    updated       TEXT NOT NULL
);
CREATE TABLE releases (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset_id    TEXT NOT NULL REFERENCES datasets (dataset_id),
    request_key   TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL,
    created       TEXT NOT NULL,
    plan          TEXT NOT NULL,
    epsilon       REAL NOT NULL,
    delta         REAL NOT NULL,
    clip_norm     REAL NOT NULL,
    centre_kind   TEXT NOT NULL,
    mode          TEXT NOT NULL,
    base_model_id TEXT NOT NULL,
    item_shape    TEXT NOT NULL,
    vector        BLOB,
    record        TEXT
);
CREATE INDEX releases_by_dataset ON releases (dataset_id);
"""
    + _KEY_TABLE
)

_FIX_PATH = "pass another file with --ledger or the DPAGG_LEDGER environment variable"


@dataclass(frozen=True)
class Spend:
    """A composed (epsilon, delta) guarantee and the composition rule that gave it."""

    epsilon: float
    delta: float
    composition: str  # "none" (no releases) | "basic" | "pld"


@dataclass(frozen=True)
class LedgerRelease:
    """A release as returned by :meth:`Ledger.release`.

    ``spent_*`` is the composed spend of the dataset *after* this release (unchanged when
    ``reused``); ``budget_*`` the dataset's budget.
    """

    release: mechanism.Release
    reused: bool
    release_id: int
    spent_epsilon: float
    spent_delta: float
    budget_epsilon: float
    budget_delta: float
    composition: str = "basic"


@dataclass(frozen=True)
class Charge:
    """The answer of :meth:`Ledger.charge` (or of its dry run :meth:`Ledger.check_charge`).

    ``reused``: an identical request is complete in the ledger; ``release`` is its stored result
    and nothing was (or would be) spent. Otherwise ``release`` is None and ``release_id`` is the
    charged row, to be completed with :meth:`Ledger.complete` (0 in a dry run: nothing written);
    ``attempt`` counts charges of this request (2, 3, ... after failed runs). ``spent_*`` is the
    dataset's composed spend after this charge; ``budget_*`` its budget.
    """

    release_id: int
    reused: bool
    attempt: int
    release: mechanism.Release | None
    spent_epsilon: float
    spent_delta: float
    budget_epsilon: float
    budget_delta: float
    composition: str


# --------------------------------------------------------------------------------------------
# Composition


def _fits(spend: Spend, budget_epsilon: float, budget_delta: float) -> bool:
    return spend.epsilon <= budget_epsilon * (1 + REL_TOL) and spend.delta <= budget_delta * (
        1 + REL_TOL
    )


def _basic(plans: Sequence[PrivacyPlan]) -> Spend:
    eps = math.fsum(float(p.epsilon) for p in plans)
    delta = math.fsum(float(p.delta) for p in plans)
    return Spend(eps, delta, "basic")


def _pld(plans: Sequence[PrivacyPlan], delta: float) -> Spend | None:
    """PLD composition of the plans' DpEvents at ``delta``; None where it does not apply."""
    if not plans or not 0 < delta < 1:
        return None
    compose = getattr(accountant, "composed_epsilon", None)
    dp_events = getattr(accountant, "dp_events", None)
    if compose is None or dp_events is None:
        return None
    if len({p.neighbouring for p in plans}) != 1:
        return None
    try:
        events = [dp_events(p) for p in plans]
    except (NotImplementedError, DpaggError):
        return None
    if any(e is None for e in events):
        return None
    eps = compose(events, delta, plans[0].neighbouring)
    if eps is None or not math.isfinite(eps):
        return None
    return Spend(float(eps), float(delta), "pld")


def calls_of_row(plan: PrivacyPlan, mode: str) -> int:
    """How many mechanism calls of ``plan`` one ledger row stands for.

    A :meth:`Ledger.release` row is one ``dp_mean`` call; a :meth:`Ledger.charge` row (DP-SGD)
    runs all ``plan.releases`` steps of its plan, so it stands for that many calls. Counting it
    once would let ``charged_blocks`` fit a second identical DP-SGD run into the first one's block.
    """
    return max(1, int(plan.releases)) if mode in CHARGE_MODES else 1


def charged_blocks(calls: Sequence[PrivacyPlan]) -> list[PrivacyPlan]:
    """The plan blocks charged for a sequence of releases (one entry per ``dp_mean`` call).

    A plan with ``releases = k`` states its (epsilon, delta) for k calls in total; calls of one
    identical plan on one dataset are charged in blocks of k: ``ceil(c / k)`` blocks for c calls.
    Sound because c <= ceil(c/k) * k calls of the same mechanism are covered by that many k-fold
    compositions (k = 1, the default, charges every call).
    """
    counts: dict[PrivacyPlan, int] = {}
    for plan in calls:
        counts[plan] = counts.get(plan, 0) + 1
    blocks: list[PrivacyPlan] = []
    for plan, c in counts.items():
        blocks += [plan] * math.ceil(c / max(1, int(plan.releases)))
    return blocks


def composed_spend(calls: Sequence[PrivacyPlan], budget_delta: float) -> Spend:
    """The composed spend of the releases ``calls`` (module docstring: rule and soundness).

    Returns the basic bound, or the PLD bound at ``budget_delta`` when basic composition exceeds
    that delta or PLD gives a smaller epsilon.
    """
    plans = charged_blocks(calls)
    if not plans:
        return Spend(0.0, 0.0, "none")
    basic = _basic(plans)
    pld = _pld(plans, budget_delta)
    if pld is None:
        return basic
    basic_delta_ok = basic.delta <= budget_delta * (1 + REL_TOL)
    if not basic_delta_ok or pld.epsilon < basic.epsilon:
        return pld
    return basic


# --------------------------------------------------------------------------------------------
# Request key


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
    stores its MAC under the ledger key (:meth:`Ledger.request_mac`).

    Two requests with the same key would be answered by the same mechanism on the same data, so
    the stored answer is returned instead of a fresh draw (post-processing is free).
    ``base_model_id`` is included because it is written into the stored privacy record.
    ``basis_sha256`` (a projected release, ``dpagg_core.subspace``) is appended only when given,
    so the keys of full-space requests are unchanged.
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
    """Digest (sha256) identifying a train-then-release request (:meth:`Ledger.charge`); stored
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


def _request_mac(secret: bytes, digest: str) -> str:
    """HMAC-SHA256 of a request digest under the ledger key: the value stored as
    ``request_key``. The unkeyed digest is a function of the per-image embeddings; stored as is,
    anyone reading the ledger could confirm a guessed image set by recomputing it."""
    return hmac.new(secret, b"dpagg-request/2\x00" + digest.encode(), hashlib.sha256).hexdigest()


def identity_key(ledger_path: str | os.PathLike[str] | None = None) -> bytes:
    """The identity key of the ledger at ``ledger_path`` (default ``paths.default_ledger_path``),
    creating the ledger if needed. See :meth:`Ledger.identity_key`."""
    return Ledger(ledger_path).identity_key()


# --------------------------------------------------------------------------------------------
# The ledger


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _check_budget_value(epsilon: float | None, delta: float | None, who: str) -> None:
    if epsilon is not None and not (math.isfinite(epsilon) and epsilon > 0):
        raise DpaggError(f"{who} epsilon={epsilon!r} is invalid: give a finite number > 0.")
    if delta is not None and not (math.isfinite(delta) and 0 <= delta < 1):
        raise DpaggError(f"{who} delta={delta!r} is invalid: give a number in [0, 1).")


def _plan_from_json(text: str) -> PrivacyPlan:
    return PrivacyPlan(**json.loads(text))


def _as_replace_one(plan: PrivacyPlan) -> PrivacyPlan:
    """A recorded plan as it is charged: a legacy add/remove row (docs/privacy.md section 1)
    at the replace-one cost of the noise it actually drew.

    Its noise std was z * C / denominator, i.e. z/2 times the replace-one sensitivity 2C /
    denominator, so its replace-one epsilon is that of noise multiplier z/2 at its delta
    (never less than it stated). If the accountant cannot evaluate it, group privacy gives
    (2 eps, (1 + e^eps) delta) (Dwork & Roth 2014, Thm 2.2 with k = 2).
    """
    if plan.neighbouring == "replace_one":
        return plan
    try:
        ro = accountant.epsilon_for(
            plan.noise_multiplier / 2.0,
            plan.delta,
            plan.n,
            plan.sampling,
            m=plan.m,
            q=plan.q,
            releases=plan.releases,
        )
    except DpaggError:
        eps = 2.0 * plan.epsilon
        return replace(
            plan,
            neighbouring="replace_one",
            noise_multiplier=plan.noise_multiplier / 2.0,
            epsilon=eps,
            delta=min((1.0 + math.exp(plan.epsilon)) * plan.delta, 1.0 - 1e-12),
            accountant="group-privacy",
        )
    return replace(ro, epsilon=max(ro.epsilon, plan.epsilon))


class Ledger:
    """Per-dataset privacy budgets and every release, in one SQLite file.

    ``path`` defaults to ``paths.default_ledger_path()`` (env ``DPAGG_LEDGER``, else the user data
    dir); parent folders are created on first use. ``timeout`` bounds the wait for another process
    holding the write lock (SQLite busy timeout), after which :class:`LedgerError` is raised.
    Each operation opens its own connection, so a ``Ledger`` can be shared across threads and
    pickled into worker processes.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.path = resolve_path(path) if path is not None else default_ledger_path()
        self.timeout = float(timeout)

    #: How a user raises a budget where this ledger's messages are shown: ``None`` names the
    #: ``dpagg`` command; a front end sets its own (ComfyUI: the Privacy Ledger node and the exact
    #: ``python -m dpagg_core.cli`` command; a module-level function, so a Ledger still pickles).
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

    # ---- connection and error handling ------------------------------------------------------

    def _error(self, exc: BaseException) -> LedgerError:
        msg = str(exc)
        name = getattr(exc, "sqlite_errorname", "")
        p = self.path
        if "locked" in msg or "busy" in msg or name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            text = (
                f"privacy ledger {p} is locked by another process for more than "
                f"{self.timeout:g} s ({msg}). No release was made. Fix: wait for the other dpagg "
                f"or ComfyUI run to finish and retry, or {_FIX_PATH}."
            )
        elif (
            "readonly" in msg
            or "read-only" in msg
            or "unable to open" in msg
            or isinstance(exc, PermissionError)
            or name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM"))
        ):
            text = (
                f"privacy ledger {p} cannot be written: the file or its folder is read-only or "
                f"missing ({msg}). No release was made. Fix: make {p} and its folder writable, or "
                f"{_FIX_PATH}."
            )
        elif isinstance(exc, OSError):
            text = (
                f"privacy ledger {p} cannot be created ({msg}). No release was made. Fix: make "
                f"{p.parent} writable, or {_FIX_PATH}."
            )
        else:
            text = (
                f"privacy ledger {p} is corrupt or not a dpagg ledger ({msg}). No release was "
                f"made. Fix: move the file aside and restore a backup (keep it: it records the "
                f"budget already spent; a fresh ledger forgets it), or {_FIX_PATH}."
            )
        return LedgerError(text)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """An autocommit connection (transactions are explicit) with a valid schema."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise self._error(exc) from exc
        try:
            con.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            con.execute("PRAGMA synchronous = FULL")
            con.execute("PRAGMA foreign_keys = ON")
            con.execute("PRAGMA secure_delete = ON")
            self._ensure_schema(con)
            yield con  # sqlite errors raised in the caller's block are mapped here too
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        finally:
            con.close()

    def _schema_state(self, con: sqlite3.Connection) -> str:
        """'ok', 'empty' (create it), 'v1' (migrate it), or raise LedgerError for a foreign or
        newer file."""
        version = con.execute("PRAGMA user_version").fetchone()[0]
        app_id = con.execute("PRAGMA application_id").fetchone()[0]
        tables = con.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id == 0 and version == 0 and tables == 0:
            return "empty"
        if app_id != APPLICATION_ID:
            raise LedgerError(
                f"{self.path} is an SQLite file but not a dpagg privacy ledger (application_id "
                f"{app_id:#x}). No release was made. Fix: {_FIX_PATH}; do not point dpagg at "
                f"another program's database."
            )
        if version == 1:
            return "v1"
        if version != SCHEMA_VERSION:
            raise LedgerError(
                f"privacy ledger {self.path} has schema version {version}, this dpagg reads "
                f"version {SCHEMA_VERSION}. No release was made. Fix: use the dpagg version that "
                f"wrote it (upgrade dpagg), or {_FIX_PATH}."
            )
        return "ok"

    def _ensure_schema(self, con: sqlite3.Connection) -> None:
        """Create the schema and the identity key in ONE write transaction (or migrate a v1
        ledger). Every other process waits on the write lock and re-checks, so concurrent first
        users all end up with the same, complete key; none can read a ledger without one."""
        if self._schema_state(con) == "ok":
            return
        con.execute("BEGIN IMMEDIATE")
        try:
            state = self._schema_state(con)  # re-check under the write lock
            if state == "empty":
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        con.execute(stmt)
                con.execute(
                    "INSERT INTO ledger_key (id, secret, origin, created) VALUES (1, ?, ?, ?)",
                    (secrets.token_bytes(KEY_BYTES), "created", _now()),
                )
                con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif state == "v1":
                self._migrate_v1(con)
            con.execute("COMMIT")
        finally:
            if con.in_transaction:
                con.execute("ROLLBACK")

    def _migrate_v1(self, con: sqlite3.Connection) -> None:
        """Schema 1 -> 2, inside the caller's write transaction.

        Schema 1 derived dataset ids from a salt in the data dir (``paths.legacy_install_salt``).
        That salt is adopted as the ledger's key, so every recorded dataset keeps its id and its
        budget. Its request keys were unkeyed SHA-256 digests of the request (including the
        per-image embeddings), which let a reader of the ledger confirm a guessed image set; they
        are replaced by their MAC under the key, which is exactly what schema 2 computes for the
        same request, so re-running a recorded request still returns its stored release.
        ``secure_delete`` (set on every connection) overwrites the old values in the file.
        """
        salt = legacy_install_salt()
        datasets = con.execute("SELECT count(*) FROM datasets").fetchone()[0]
        if salt is None and datasets:
            raise LedgerError(
                f"privacy ledger {self.path} was written by an older dpagg (schema 1) whose "
                f"dataset ids were keyed by the install salt in the data dir, and no salt file "
                f"was found there. Without it the {datasets} recorded dataset(s) could not be "
                "matched to their images (their budgets would silently reset), so the ledger was "
                "not upgraded and nothing was released. Fix: set DPAGG_DATA_DIR to the data dir "
                "of the installation that wrote this ledger (the folder holding its 'salt' file) "
                "and run again once; the salt then moves into the ledger."
            )
        secret, origin = (salt, "adopted-install-salt") if salt else (None, "created")
        if secret is None:
            secret = secrets.token_bytes(KEY_BYTES)
        con.execute(_KEY_TABLE)
        con.execute(
            "INSERT INTO ledger_key (id, secret, origin, created) VALUES (1, ?, ?, ?)",
            (secret, origin, _now()),
        )
        rows = con.execute("SELECT id, request_key FROM releases").fetchall()
        for row_id, old in rows:
            base, sep, attempt = str(old).partition("#")
            con.execute(
                "UPDATE releases SET request_key = ? WHERE id = ?",
                (_request_mac(secret, base) + sep + attempt, row_id),
            )
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        log.info("privacy ledger %s upgraded to schema %d (%s key)", self.path, 2, origin)

    def _secret(self, con: sqlite3.Connection) -> bytes:
        row = con.execute("SELECT secret FROM ledger_key WHERE id = 1").fetchone()
        secret = None if row is None else row[0]
        if not isinstance(secret, bytes) or len(secret) != KEY_BYTES:
            raise LedgerError(
                f"privacy ledger {self.path} has a missing or damaged identity key (expected "
                f"{KEY_BYTES} bytes, found "
                f"{'none' if secret is None else f'{type(secret).__name__} of {len(secret)}'}). "
                "Dataset ids cannot be computed safely, so nothing was released. Fix: restore the "
                f"ledger from a backup, or {_FIX_PATH}."
            )
        return secret

    # ---- identity ----------------------------------------------------------------------------

    def identity_key(self) -> bytes:
        """The ledger's secret key (32 bytes), creating the ledger if needed.

        Every value the ledger stores or the caller derives from private data is keyed by it:
        dataset ids (:func:`embeddings.dataset_id_for`), request keys, the authentication tag of
        private per-image files. Because it lives in the ledger file, every process using this
        ledger (CLI, ComfyUI, WebUI, other users or data dirs) sees the same pictures as the same
        dataset (docs/privacy.md invariant 7). It is never released, logged or written anywhere
        else.
        """
        with self._connect() as con:
            return self._secret(con)

    def dataset_id(self, digests: Any) -> str:
        """Id of the image set with per-image ``digests`` under this ledger's key."""
        from dpagg_core.embeddings import dataset_id_for

        return dataset_id_for(digests, key=self.identity_key())

    def request_mac(self, digest: str) -> str:
        """The stored key of a request with :func:`request_key` / :func:`charge_key` ``digest``."""
        return _request_mac(self.identity_key(), digest)

    # ---- reads -------------------------------------------------------------------------------

    @staticmethod
    def _upsert_budget(
        con: sqlite3.Connection, dataset_id: str, epsilon: float, delta: float
    ) -> None:
        """Set ``dataset_id``'s budget, creating its row if needed (caller holds the lock)."""
        now = _now()
        con.execute(
            "INSERT INTO datasets (dataset_id, epsilon_total, delta_total, created, updated) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (dataset_id) DO UPDATE SET epsilon_total = "
            "excluded.epsilon_total, delta_total = excluded.delta_total, updated = "
            "excluded.updated",
            (dataset_id, epsilon, delta, now, now),
        )

    @staticmethod
    def _budget(con: sqlite3.Connection, dataset_id: str) -> tuple[float, float] | None:
        row = con.execute(
            "SELECT epsilon_total, delta_total FROM datasets WHERE dataset_id = ?", (dataset_id,)
        ).fetchone()
        return None if row is None else (float(row[0]), float(row[1]))

    @staticmethod
    def _plans(con: sqlite3.Connection, dataset_id: str) -> list[PrivacyPlan]:
        """Recorded calls: one plan per mechanism call, with the charged (epsilon, delta) as
        stored in the row. A charged (DP-SGD) row appears ``plan.releases`` times
        (:func:`calls_of_row`)."""
        plans = []
        for plan_json, eps, delta, mode in con.execute(
            "SELECT plan, epsilon, delta, mode FROM releases WHERE dataset_id = ? ORDER BY id",
            (dataset_id,),
        ):
            try:
                plan = _plan_from_json(plan_json)
            except (TypeError, ValueError) as exc:
                raise LedgerError(
                    f"privacy ledger has an unreadable plan for dataset {dataset_id!r} ({exc}); "
                    f"the ledger is corrupt. Fix: restore a backup, or {_FIX_PATH}."
                ) from exc
            if plan.epsilon != eps or plan.delta != delta:
                raise LedgerError(
                    f"privacy ledger row for dataset {dataset_id!r} is inconsistent (charged "
                    f"{eps}, {delta} vs plan {plan.epsilon}, {plan.delta}); the ledger is corrupt."
                    f" Fix: restore a backup, or {_FIX_PATH}."
                )
            plans.extend([_as_replace_one(plan)] * calls_of_row(plan, mode))
        return plans

    # ---- public API --------------------------------------------------------------------------

    def status(self, dataset_id: str) -> dict[str, Any]:
        """Budget, composed spend, remaining budget and number of releases of ``dataset_id``.

        ``{"dataset_id", "budget": {"epsilon","delta"} | None, "spent": {"epsilon","delta"},
        "remaining": {"epsilon","delta"} | None, "releases": int, "incomplete": int,
        "composition": str}``. ``releases`` counts recorded rows (a DP-SGD run is one row);
        ``incomplete`` those charged by :meth:`charge` whose result was never stored (a failed or
        still-running DP-SGD run: spent, nothing to return). Under PLD composition the spend is
        reported at the budget's delta, so remaining delta is 0 and only epsilon is left to spend
        (the next request is re-composed from scratch).
        """
        with self._connect() as con:
            con.execute("BEGIN")
            try:
                budget = self._budget(con, dataset_id)
                plans = self._plans(con, dataset_id)
                rows, complete = con.execute(
                    "SELECT count(*), count(vector) FROM releases WHERE dataset_id = ?",
                    (dataset_id,),
                ).fetchone()
            finally:
                con.execute("ROLLBACK")
        spend = composed_spend(plans, budget[1] if budget else 0.0)
        out: dict[str, Any] = {
            "dataset_id": dataset_id,
            "budget": None,
            "spent": {"epsilon": spend.epsilon, "delta": spend.delta},
            "remaining": None,
            "releases": int(rows),
            "incomplete": int(rows) - int(complete),
            "composition": spend.composition,
        }
        if budget is not None:
            out["budget"] = {"epsilon": budget[0], "delta": budget[1]}
            out["remaining"] = {
                "epsilon": max(0.0, budget[0] - spend.epsilon),
                "delta": max(0.0, budget[1] - spend.delta),
            }
        return out

    def _effective_budget(
        self,
        stored: tuple[float, float] | None,
        plan: PrivacyPlan,
        budget_epsilon: float | None,
        budget_delta: float | None,
        dataset_id: str,
    ) -> tuple[float, float]:
        """The budget a request is checked against.

        No stored budget: the requested one, else this release's own (epsilon, delta). A stored
        budget is never raised implicitly: a larger requested value is refused (raise it with
        ``set_budget``); a smaller one acts as an extra cap for this request.
        """
        if stored is None:
            return (
                float(plan.epsilon if budget_epsilon is None else budget_epsilon),
                float(plan.delta if budget_delta is None else budget_delta),
            )
        eps, delta = stored
        for label, req, cur in (("epsilon", budget_epsilon, eps), ("delta", budget_delta, delta)):
            if req is not None and req > cur * (1 + REL_TOL):
                raise BudgetExceeded(
                    f"budget_{label}={req:g} is above dataset {dataset_id!r}'s recorded budget "
                    f"{label} {cur:g} in {self.path}. A budget is never raised implicitly. Fix: "
                    f"raise it deliberately with {self.how_to_raise(dataset_id)}, or set "
                    f"budget_{label} to 0 (keep the recorded budget)."
                )
        return (
            eps if budget_epsilon is None else min(eps, budget_epsilon),
            delta if budget_delta is None else min(delta, budget_delta),
        )

    def _refusal(
        self,
        dataset_id: str,
        path: Path,
        spent: Spend,
        plan: PrivacyPlan,
        after: Spend,
        budget: tuple[float, float],
    ) -> BudgetExceeded:
        raise_it = f"raise the budget deliberately with {self.how_to_raise(dataset_id)}"
        used_up = spent.epsilon >= budget[0] * (1 - REL_TOL) or spent.delta >= budget[1] * (
            1 - REL_TOL
        )
        if used_up:  # no epsilon, however small, fits: only a larger budget helps
            fix = (
                f"this image set's budget is used up, so no release fits whatever its epsilon. "
                f"Fix: {raise_it} (ledger {path}), or release nothing more from these images."
            )
        else:
            fix = (
                f"Fix: use a larger noise (smaller epsilon: about {budget[0] - spent.epsilon:.4g} "
                f"of the budget is left) for this release, or {raise_it} (ledger {path})."
            )
        return BudgetExceeded(
            f"privacy budget of dataset {dataset_id!r} would be exceeded: spent "
            f"epsilon={spent.epsilon:.6g}, delta={spent.delta:.3g} ({spent.composition} "
            f"composition); budget epsilon={budget[0]:.6g}, delta={budget[1]:.3g}; requested "
            f"epsilon={plan.epsilon:.6g}, delta={plan.delta:.3g} (total would be "
            f"epsilon={after.epsilon:.6g}, delta={after.delta:.3g}). No noise was drawn, nothing "
            f"was spent; {fix}"
        )

    def _check_locked(
        self,
        con: sqlite3.Connection,
        dataset_id: str,
        plan: PrivacyPlan,
        budget_epsilon: float | None,
        budget_delta: float | None,
        mode: str = "clip",
    ) -> tuple[tuple[float, float] | None, tuple[float, float], list[PrivacyPlan], Spend]:
        stored = self._budget(con, dataset_id)
        budget = self._effective_budget(stored, plan, budget_epsilon, budget_delta, dataset_id)
        plans = self._plans(con, dataset_id)
        after = composed_spend([*plans, *[plan] * calls_of_row(plan, mode)], budget[1])
        if not _fits(after, *budget):
            raise self._refusal(
                dataset_id, self.path, composed_spend(plans, budget[1]), plan, after, budget
            )
        return stored, budget, plans, after

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
        checks a :meth:`charge` (all ``plan.releases`` calls at once) instead of one call.
        """
        _validate_ids(dataset_id, "check")
        if mode not in MODES + CHARGE_MODES:
            raise DpaggError(f"mode={mode!r} is invalid: use one of {MODES + CHARGE_MODES}.")
        _check_plan(plan)
        _check_plan_cost(plan)
        _check_budget_value(budget_epsilon, budget_delta, "budget")
        with self._connect() as con:
            con.execute("BEGIN")
            try:
                _, budget, _, after = self._check_locked(
                    con, dataset_id, plan, budget_epsilon, budget_delta, mode
                )
            finally:
                con.execute("ROLLBACK")
        return {
            "budget": {"epsilon": budget[0], "delta": budget[1]},
            "spent_after": {"epsilon": after.epsilon, "delta": after.delta},
            "composition": after.composition,
        }

    def adopt_dataset(self, old_id: str, new_id: str) -> bool:
        """Move everything recorded for ``old_id`` to ``new_id`` (the same pictures under a new
        identification rule, e.g. the canonical decode that replaced dpagg <= 0.2's); True if
        anything moved.

        One write transaction. If ``new_id`` already has a budget, the smaller one is kept
        (budgets only ever get stricter this way), and every release of both ids counts against
        it. Request keys are not rewritten, so an identical re-run under the new id is charged
        again (conservative). A no-op when ``old_id`` is unknown or equals ``new_id``.
        """
        _validate_ids(old_id, "adopt_dataset")
        _validate_ids(new_id, "adopt_dataset")
        if old_id == new_id:
            return False
        with self._connect() as con:
            if self._budget(con, old_id) is None:  # the usual case: no write lock taken
                return False
            try:
                con.execute("BEGIN IMMEDIATE")
                try:
                    old = self._budget(con, old_id)  # re-read under the write lock
                    if old is None:
                        return False
                    new = self._budget(con, new_id)
                    eps, delta = old if new is None else (min(old[0], new[0]), min(old[1], new[1]))
                    self._upsert_budget(con, new_id, eps, delta)
                    con.execute(
                        "UPDATE releases SET dataset_id = ? WHERE dataset_id = ?", (new_id, old_id)
                    )
                    con.execute("DELETE FROM datasets WHERE dataset_id = ?", (old_id,))
                    con.execute("COMMIT")
                finally:
                    if con.in_transaction:
                        con.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
        log.warning(
            "privacy ledger %s: the budget of an image set recorded under dpagg's old image "
            "decode now applies to its new id %s",
            self.path,
            new_id,
        )
        return True

    def set_budget(self, dataset_id: str, epsilon: float, delta: float) -> dict[str, Any]:
        """Set (raise or lower) the budget of ``dataset_id``; returns the new :meth:`status`.

        Lowering it below what is already spent (composed at the new delta) is refused with
        BudgetExceeded: the spent privacy cannot be taken back.
        """
        _validate_ids(dataset_id, "set_budget")
        _check_budget_value(epsilon, delta, "set_budget")
        epsilon, delta = float(epsilon), float(delta)
        with self._connect() as con:
            try:
                con.execute("BEGIN IMMEDIATE")
                try:
                    plans = self._plans(con, dataset_id)
                    spent = composed_spend(plans, delta)
                    if not _fits(spent, epsilon, delta):
                        raise BudgetExceeded(
                            f"cannot set the budget of dataset {dataset_id!r} to epsilon="
                            f"{epsilon:g}, delta={delta:g}: already spent epsilon="
                            f"{spent.epsilon:.6g}, delta={spent.delta:.3g} ({spent.composition} "
                            f"composition at delta={delta:g}) in {self.path}. Spent privacy cannot "
                            f"be taken back. Fix: choose a budget at least the spent amount."
                        )
                    self._upsert_budget(con, dataset_id, epsilon, delta)
                    con.execute("COMMIT")
                finally:
                    if con.in_transaction:
                        con.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
        return self.status(dataset_id)

    def release(
        self,
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
        """Release one DP mean of ``vectors`` [n, D] under ``plan``, recorded in the ledger.

        Order (invariant 5): inputs are validated (``mechanism.check_inputs``) before anything is
        touched; then in ONE ``BEGIN IMMEDIATE`` transaction: an identical earlier request returns
        its stored release (``reused=True``, nothing spent); the composed spend of recorded + this
        release is checked against the budget (refused with BudgetExceeded before any noise is
        drawn); a first row is written (so a read-only or full disk fails before the draw); the
        noise is drawn (``mechanism.dp_mean``); the row is completed and committed. The result is
        returned only after COMMIT: if anything fails before, the transaction is rolled back and
        the drawn value is discarded without ever leaving this function, so nothing was released.

        ``basis`` (a ``dpagg_core.subspace.PublicBasis``): aggregate in that public subspace
        (``subspace.dp_mean_projected``; same plan and sensitivity). Its sha256 enters the request
        key and the record; a basis for another D or another ``base_model_id`` is refused here.
        The stored vector is the raw release in the full D (post-processing comes after).
        """
        _validate_ids(dataset_id, "release", name=name)
        if mode not in MODES:
            raise DpaggError(f"mode={mode!r} is invalid: use one of {MODES}.")
        if not isinstance(centre_kind, str) or not isinstance(base_model_id, str):
            raise DpaggError("centre_kind and base_model_id must be strings.")
        _check_plan(plan)
        _check_budget_value(budget_epsilon, budget_delta, "budget")
        # Everything dp_mean would refuse is refused here, before the ledger is even opened.
        # check_inputs returns float64 numpy copies (it also accepts torch tensors).
        arr, ctr = mechanism.check_inputs(vectors, plan, clip_norm, center, mode=mode)
        mechanism.privacy_record(
            plan, clip_norm, mode=mode, centre_kind=centre_kind, base_model_id=base_model_id
        )
        if basis is not None:
            from .subspace import check_basis

            check_basis(basis, flat_dim=arr[0].size, base_model_id=base_model_id)
        _check_plan_cost(plan)
        key = request_key(
            arr,
            dataset_id=dataset_id,
            plan=plan,
            clip_norm=clip_norm,
            center=ctr,
            centre_kind=centre_kind,
            mode=mode,
            name=name,
            base_model_id=base_model_id,
            basis_sha256=None if basis is None else basis.sha256,
        )
        with self._connect() as con:
            try:
                con.execute("BEGIN IMMEDIATE")
                try:
                    result = self._release_locked(
                        con,
                        arr,
                        key=key,
                        dataset_id=dataset_id,
                        plan=plan,
                        clip_norm=clip_norm,
                        center=ctr,
                        centre_kind=centre_kind,
                        name=name,
                        base_model_id=base_model_id,
                        budget_epsilon=budget_epsilon,
                        budget_delta=budget_delta,
                        mode=mode,
                        basis=basis,
                    )
                    if not result.reused:
                        if _before_commit_hook is not None:
                            _before_commit_hook()
                        con.execute("COMMIT")
                finally:
                    if con.in_transaction:
                        con.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
        return result

    def _release_locked(
        self,
        con: sqlite3.Connection,
        arr: np.ndarray,
        *,
        key: str,
        dataset_id: str,
        plan: PrivacyPlan,
        clip_norm: float,
        center: np.ndarray | None,
        centre_kind: str,
        name: str,
        base_model_id: str,
        budget_epsilon: float | None,
        budget_delta: float | None,
        mode: str,
        basis: Any = None,
    ) -> LedgerRelease:
        key = _request_mac(self._secret(con), key)
        row = con.execute(
            "SELECT id, vector, record, item_shape FROM releases WHERE request_key = ?", (key,)
        ).fetchone()
        if row is not None:
            stored = self._budget(con, dataset_id)
            assert stored is not None, "a release row without its dataset budget"
            spent = composed_spend(self._plans(con, dataset_id), stored[1])
            return LedgerRelease(
                release=_make_release(row[1], row[2], row[3]),
                reused=True,
                release_id=int(row[0]),
                spent_epsilon=spent.epsilon,
                spent_delta=spent.delta,
                budget_epsilon=stored[0],
                budget_delta=stored[1],
                composition=spent.composition,
            )

        stored, budget, _, after = self._check_locked(
            con, dataset_id, plan, budget_epsilon, budget_delta
        )
        now = _now()
        if stored is None:  # first release of this dataset sets its budget
            con.execute(
                "INSERT INTO datasets (dataset_id, epsilon_total, delta_total, created, updated) "
                "VALUES (?, ?, ?, ?, ?)",
                (dataset_id, budget[0], budget[1], now, now),
            )
        # First write to the releases table BEFORE the draw: proves the file is writable (a
        # read-only file only fails on the first write, not on BEGIN IMMEDIATE).
        cur = con.execute(
            "INSERT INTO releases (dataset_id, request_key, name, created, plan, epsilon, delta, "
            "clip_norm, centre_kind, mode, base_model_id, item_shape) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                dataset_id,
                key,
                name,
                now,
                json.dumps(plan.to_dict(), sort_keys=True),
                float(plan.epsilon),
                float(plan.delta),
                float(clip_norm),
                centre_kind,
                mode,
                base_model_id,
                json.dumps([int(d) for d in arr.shape[1:]]),
            ),
        )
        release_id = int(cur.lastrowid)
        if basis is None:
            release = mechanism.dp_mean(
                arr,
                plan=plan,
                clip_norm=clip_norm,
                center=center,
                mode=mode,
                base_model_id=base_model_id,
                centre_kind=centre_kind,
            )
        else:
            from .subspace import dp_mean_projected

            release = dp_mean_projected(
                arr,
                plan=plan,
                clip_norm=clip_norm,
                basis=basis,
                center=center,
                mode=mode,
                base_model_id=base_model_id,
                centre_kind=centre_kind,
            )
        vec = np.ascontiguousarray(np.asarray(release.vector, dtype=np.float64))
        con.execute(
            "UPDATE releases SET vector = ?, record = ? WHERE id = ?",
            (vec.astype("<f8").tobytes(), json.dumps(release.record, sort_keys=True), release_id),
        )
        return LedgerRelease(
            release=release,
            reused=False,
            release_id=release_id,
            spent_epsilon=after.epsilon,
            spent_delta=after.delta,
            budget_epsilon=budget[0],
            budget_delta=budget[1],
            composition=after.composition,
        )

    # ---- train-then-release (DP-SGD): charge before the noise, complete afterwards ------------

    def _charge_args(
        self,
        dataset_id: str,
        plan: PrivacyPlan,
        request: Mapping[str, Any],
        name: str,
        clip_norm: float,
        centre_kind: str,
        mode: str,
        base_model_id: str,
        budget_epsilon: float | None,
        budget_delta: float | None,
    ) -> str:
        """Validate a charge request (nothing touched) and return its key."""
        _validate_ids(dataset_id, "charge", name=name)
        if mode not in CHARGE_MODES:
            raise DpaggError(f"mode={mode!r} is invalid for charge: use one of {CHARGE_MODES}.")
        if not isinstance(centre_kind, str) or not isinstance(base_model_id, str):
            raise DpaggError("centre_kind and base_model_id must be strings.")
        if not isinstance(request, Mapping):
            raise DpaggError(f"request={request!r} must be a mapping (a dict of JSON values).")
        _check_plan(plan)
        _check_budget_value(budget_epsilon, budget_delta, "budget")
        # The record the result will carry must be valid (C > 0 and finite, public strings).
        mechanism.privacy_record(
            plan, clip_norm, centre_kind=centre_kind, base_model_id=base_model_id
        )
        _check_plan_cost(plan)
        return charge_key(
            dataset_id=dataset_id,
            plan=plan,
            request=request,
            clip_norm=clip_norm,
            centre_kind=centre_kind,
            mode=mode,
            name=name,
            base_model_id=base_model_id,
        )

    def _charge_locked(
        self,
        con: sqlite3.Connection,
        key: str,
        *,
        write: bool,
        dataset_id: str,
        plan: PrivacyPlan,
        name: str,
        clip_norm: float,
        centre_kind: str,
        mode: str,
        base_model_id: str,
        budget_epsilon: float | None,
        budget_delta: float | None,
    ) -> Charge:
        key = _request_mac(self._secret(con), key)
        # Every earlier attempt of this request: the key itself, then key#2, key#3, ...
        rows = con.execute(
            "SELECT id, vector, record, item_shape FROM releases WHERE request_key = ? OR "
            "substr(request_key, 1, ?) = ? ORDER BY id",
            (key, len(key) + 1, key + "#"),
        ).fetchall()
        done = [r for r in rows if r[1] is not None]
        if done:  # identical request, completed: post-processing of it is free
            row = done[0]
            stored = self._budget(con, dataset_id)
            assert stored is not None, "a release row without its dataset budget"
            spent = composed_spend(self._plans(con, dataset_id), stored[1])
            return Charge(
                release_id=int(row[0]),
                reused=True,
                attempt=len(rows),
                release=_make_release(row[1], row[2], row[3]),
                spent_epsilon=spent.epsilon,
                spent_delta=spent.delta,
                budget_epsilon=stored[0],
                budget_delta=stored[1],
                composition=spent.composition,
            )
        attempt = len(rows) + 1  # incomplete attempts are spent, never answered from
        stored, budget, _, after = self._check_locked(
            con, dataset_id, plan, budget_epsilon, budget_delta, mode
        )
        release_id = 0
        if write:
            now = _now()
            if stored is None:  # first release of this dataset sets its budget
                con.execute(
                    "INSERT INTO datasets (dataset_id, epsilon_total, delta_total, created, "
                    "updated) VALUES (?, ?, ?, ?, ?)",
                    (dataset_id, budget[0], budget[1], now, now),
                )
            cur = con.execute(
                "INSERT INTO releases (dataset_id, request_key, name, created, plan, epsilon, "
                "delta, clip_norm, centre_kind, mode, base_model_id, item_shape) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    dataset_id,
                    key if attempt == 1 else f"{key}#{attempt}",
                    name,
                    now,
                    json.dumps(plan.to_dict(), sort_keys=True),
                    float(plan.epsilon),
                    float(plan.delta),
                    float(clip_norm),
                    centre_kind,
                    mode,
                    base_model_id,
                    "null",  # set by complete()
                ),
            )
            release_id = int(cur.lastrowid)
        return Charge(
            release_id=release_id,
            reused=False,
            attempt=attempt,
            release=None,
            spent_epsilon=after.epsilon,
            spent_delta=after.delta,
            budget_epsilon=budget[0],
            budget_delta=budget[1],
            composition=after.composition,
        )

    def charge(
        self,
        *,
        dataset_id: str,
        plan: PrivacyPlan,
        request: Mapping[str, Any],
        name: str,
        clip_norm: float,
        centre_kind: str = "initializer",
        mode: str = "dpsgd",
        base_model_id: str = "",
        budget_epsilon: float | None = None,
        budget_delta: float | None = None,
        _dry_run: bool = False,
    ) -> Charge:
        """Record the spend of a train-then-release mechanism BEFORE it draws any noise.

        For mechanisms that draw noise over a long run (DP-SGD: T steps), where holding the write
        lock throughout would block every other release (module docstring). In ONE ``BEGIN
        IMMEDIATE`` transaction: an identical request (:func:`charge_key` of all arguments but the
        budget) whose row is complete returns its stored result (``reused=True``, nothing spent);
        the composed spend of the recorded calls plus ALL ``plan.releases`` calls of this plan is
        checked against the budget (BudgetExceeded, nothing written); a row without a vector is
        inserted and COMMITTED. Only then may the caller draw noise, and it must store the result
        with :meth:`complete`. The spend counts from the commit on, whatever happens to the run
        (invariant 5). Earlier incomplete attempts of the same request are spent but hold no
        result, so a re-run is charged again (a new attempt, key suffixed ``#<attempt>``).

        ``clip_norm`` is the mechanism's public clip (DP-SGD: the per-example gradient bound
        C_g), ``request`` a dict of JSON values naming everything else the result depends on.
        """
        key = self._charge_args(
            dataset_id,
            plan,
            request,
            name,
            clip_norm,
            centre_kind,
            mode,
            base_model_id,
            budget_epsilon,
            budget_delta,
        )
        with self._connect() as con:
            try:
                con.execute("BEGIN" if _dry_run else "BEGIN IMMEDIATE")
                try:
                    result = self._charge_locked(
                        con,
                        key,
                        write=not _dry_run,
                        dataset_id=dataset_id,
                        plan=plan,
                        name=name,
                        clip_norm=float(clip_norm),
                        centre_kind=centre_kind,
                        mode=mode,
                        base_model_id=base_model_id,
                        budget_epsilon=budget_epsilon,
                        budget_delta=budget_delta,
                    )
                    if not _dry_run and not result.reused:
                        con.execute("COMMIT")
                finally:
                    if con.in_transaction:
                        con.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
        return result

    def check_charge(self, **kwargs: Any) -> Charge:
        """Dry run of :meth:`charge` (same arguments): the stored result of an identical
        completed request (``reused=True``), or the spend a charge would leave (``release_id``
        0), or BudgetExceeded. Writes nothing; lets a caller refuse or reuse before training."""
        return self.charge(**kwargs, _dry_run=True)

    def complete(self, release_id: int, vector: Any, record: Mapping[str, str]) -> LedgerRelease:
        """Store the result of a charged release (:meth:`charge`): ``vector`` (any shape;
        rounded to the published float32 precision, ``mechanism.to_published_precision``) and its
        public privacy ``record``. Spends nothing (the charge did). Each charged row is completed
        once; an identical request then returns it.
        """
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
        with self._connect() as con:
            try:
                con.execute("BEGIN IMMEDIATE")
                try:
                    row = con.execute(
                        "SELECT dataset_id, vector, mode FROM releases WHERE id = ?", (rid,)
                    ).fetchone()
                    if row is None:
                        raise DpaggError(
                            f"complete: no release with id {rid} in ledger {self.path}; pass the "
                            "release_id returned by charge."
                        )
                    if row[2] not in CHARGE_MODES or row[1] is not None:
                        raise DpaggError(
                            f"complete: release {rid} in {self.path} is not an open charge (mode "
                            f"{row[2]!r}, {'complete' if row[1] is not None else 'incomplete'}); "
                            "each charge is completed once. Nothing was changed."
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
                    stored = self._budget(con, row[0])
                    assert stored is not None, "a release row without its dataset budget"
                    spent = composed_spend(self._plans(con, row[0]), stored[1])
                    con.execute("COMMIT")
                finally:
                    if con.in_transaction:
                        con.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
        return LedgerRelease(
            release=mechanism.Release(vector=vec.copy(), record=dict(record)),
            reused=False,
            release_id=rid,
            spent_epsilon=spent.epsilon,
            spent_delta=spent.delta,
            budget_epsilon=stored[0],
            budget_delta=stored[1],
            composition=spent.composition,
        )

    def note_file(self, release_id: int, file_name: str) -> None:
        """Remember the file name a release was written under (``mystyle-2`` for a request named
        ``mystyle``), for ``dpagg ledger show`` and the Privacy Ledger node. Display only: the
        request key keeps the requested name. The table is created on first use (a ledger
        without it still reads, in this and older dpagg versions)."""
        if not isinstance(file_name, str) or not file_name:
            raise DpaggError(f"note_file: file_name={file_name!r} is invalid: give a name.")
        with self._connect() as con:
            try:
                con.execute("BEGIN IMMEDIATE")
                con.execute(_FILES_TABLE)
                con.execute(
                    "INSERT INTO release_files (release_id, file_name, created) VALUES (?, ?, ?)",
                    (int(release_id), str(file_name), _now()),
                )
                con.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
            finally:
                if con.in_transaction:
                    con.execute("ROLLBACK")

    def _files(self, con: sqlite3.Connection) -> dict[int, list[str]]:
        exists = con.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'release_files'"
        ).fetchone()
        out: dict[int, list[str]] = {}
        if exists:
            for rid, fname in con.execute(
                "SELECT release_id, file_name FROM release_files ORDER BY rowid"
            ):
                if fname not in out.setdefault(int(rid), []):
                    out[int(rid)].append(fname)
        return out

    def dataset_ids(self) -> list[str]:
        """Every dataset with a budget or a release (sorted); ids only, nothing private."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT dataset_id FROM datasets UNION SELECT dataset_id FROM releases ORDER BY 1"
            ).fetchall()
        return [r[0] for r in rows]

    def list_releases(
        self, dataset_id: str | None = None, *, with_vectors: bool = False
    ) -> list[dict[str, Any]]:
        """Recorded releases (oldest first), of one dataset or all; vectors only if asked."""
        sql = f"SELECT {_COLUMNS} FROM releases"
        args: tuple[Any, ...] = ()
        if dataset_id is not None:
            sql += " WHERE dataset_id = ?"
            args = (dataset_id,)
        with self._connect() as con:
            rows = con.execute(sql + " ORDER BY id", args).fetchall()
            files = self._files(con)
        out = [_row_dict(r, with_vectors) for r in rows]
        for r in out:  # the file name(s) actually written (a re-used release may be rewritten)
            r["files"] = files.get(r["id"], [])
        return out

    def get_release(self, release_id: int) -> dict[str, Any]:
        """One recorded release, with its vector (np.float64 [D]) and record.

        A charged row not yet completed (:meth:`charge`) has ``vector`` and ``record`` None and
        ``complete`` False."""
        with self._connect() as con:
            row = con.execute(
                f"SELECT {_COLUMNS} FROM releases WHERE id = ?", (int(release_id),)
            ).fetchone()
        if row is None:
            raise DpaggError(
                f"no release with id {release_id} in ledger {self.path}. Fix: list them with "
                f"`dpagg ledger list`."
            )
        return _row_dict(row, True)


_COLUMN_NAMES = (
    "id",
    "dataset_id",
    "request_key",
    "name",
    "created",
    "plan",
    "epsilon",
    "delta",
    "clip_norm",
    "centre_kind",
    "mode",
    "base_model_id",
    "item_shape",
    "vector",
    "record",
)
_COLUMNS = ", ".join(_COLUMN_NAMES)


def _row_dict(row: Sequence[Any], with_vectors: bool) -> dict[str, Any]:
    d = dict(zip(_COLUMN_NAMES, row, strict=True))
    d["plan"] = json.loads(d["plan"])
    d["record"] = json.loads(d["record"]) if d["record"] is not None else None
    d["item_shape"] = json.loads(d["item_shape"])
    d["complete"] = d["vector"] is not None  # False: charged (spent) but no result stored
    if with_vectors:
        d["vector"] = None if d["vector"] is None else _vector(d["vector"], d["item_shape"])
    else:
        del d["vector"]
    return d


def _vector(blob: bytes, item_shape: list[int]) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f8").astype(np.float64).reshape(item_shape)


def _make_release(vector_blob: bytes, record_json: str, item_shape: str) -> mechanism.Release:
    vector = _vector(vector_blob, json.loads(item_shape))
    return mechanism.Release(vector=vector, record=json.loads(record_json))


def _validate_ids(dataset_id: Any, who: str, *, name: Any = "x") -> None:
    if not isinstance(dataset_id, str) or not dataset_id:
        raise DpaggError(f"{who}: dataset_id={dataset_id!r} is invalid: give a non-empty string.")
    if not isinstance(name, str) or not name:
        raise DpaggError(f"{who}: name={name!r} is invalid: give a non-empty string.")


def _check_plan(plan: Any) -> None:
    if not isinstance(plan, PrivacyPlan):
        raise DpaggError(
            f"plan={plan!r} is not a PrivacyPlan: build one with accountant.calibrate."
        )
    eps, delta = plan.epsilon, plan.delta
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise DpaggError(f"plan.epsilon={eps!r} is invalid: it must be a finite number >= 0.")
    if not (isinstance(delta, (int, float)) and 0 <= delta < 1):
        raise DpaggError(f"plan.delta={delta!r} is invalid: it must lie in [0, 1).")


@functools.lru_cache(maxsize=256)
def _reference_epsilon(
    z: float, delta: float, n: int, sampling: str, m: Any, q: Any, releases: int, rel: str
) -> float:
    return float(
        accountant.epsilon_for(
            z, delta, n, sampling, m=m, q=q, releases=releases, neighbouring=rel
        ).epsilon
    )


def _check_plan_cost(plan: PrivacyPlan) -> None:
    """Refuse a plan whose stated epsilon understates what its noise costs.

    The ledger charges ``plan.epsilon``; a hand-built or stale plan with a smaller epsilon than
    the accountant's bound for its noise multiplier would be under-charged. Overstating is fine
    (conservative). Raises DpaggError before anything is drawn or written.
    """
    ref = _reference_epsilon(
        float(plan.noise_multiplier),
        float(plan.delta),
        int(plan.n),
        plan.sampling,
        plan.m,
        plan.q,
        int(plan.releases),
        plan.neighbouring,
    )
    if plan.epsilon < ref * (1 - REL_TOL):
        raise DpaggError(
            f"plan.epsilon={plan.epsilon:.6g} understates the privacy cost of its noise: the "
            f"accountant gives epsilon={ref:.6g} for noise_multiplier={plan.noise_multiplier:g}, "
            f"delta={plan.delta:g}. Fix: build the plan with accountant.calibrate or "
            f"accountant.epsilon_for (`dpagg account`) instead of by hand."
        )
