"""The privacy ledger's SQLite store: schema, connections, the write transaction, row codecs.

Storage: the stdlib ``sqlite3`` module, one file (default ``paths.default_ledger_path()``).

* Journal mode: the classic rollback journal (``journal_mode=DELETE``) with
  ``synchronous=FULL``. Both it and WAL are atomic and durable under process kill and power loss
  with FULL sync; the rollback journal is chosen because it keeps the ledger a single file at rest,
  needs no shared-memory ``-shm`` file (WAL does not work on network file systems and cannot be
  read from a read-only directory), and dpagg writes a handful of rows per run, so WAL's
  reader/writer concurrency buys nothing. A process killed mid-transaction leaves a hot journal
  that the next opener rolls back automatically.
* Concurrency: every write is one ``BEGIN IMMEDIATE`` transaction (:func:`write_transaction`),
  which takes the write lock before the budget is read, so two processes cannot both see the same
  remaining budget. Waiting for the lock is bounded by ``busy_timeout``. No noise is ever drawn
  while the lock is held (``Ledger.reserve`` commits the spend first).
* Schema: versioned by ``PRAGMA user_version`` and marked by ``PRAGMA application_id``; created on
  first use inside a write transaction (safe when several processes start at once).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from dpagg_core.errors import LedgerError
from dpagg_core.paths import HOST_SUBDIR, data_dir, legacy_install_salt
from dpagg_core.privacy import mechanism
from dpagg_core.privacy.composition import as_replace_one, calls_of_row
from dpagg_core.privacy.identity import SET_UNIT_PREFIX
from dpagg_core.privacy.plan import PrivacyPlan
from dpagg_core.privacy.request_keys import request_mac

log = logging.getLogger(__name__)

# Version 2 keeps the identity key inside the ledger and stores request keys as keyed MACs.
# Version 3 charges every release to each of its pictures (keyed image ids, per-image budgets)
# and binds each open reservation to the process that made it (``releases.owner``).
SCHEMA_VERSION = 3
KEY_BYTES = 32
APPLICATION_ID = 0x44504147  # "DPAG": marks a dpagg ledger, so a foreign SQLite file is refused.
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
FILES_TABLE = (
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
    record        TEXT,
    owner         TEXT
);
CREATE INDEX releases_by_dataset ON releases (dataset_id);
"""
    + _KEY_TABLE
)

# Schema 3: the picture is the unit of account (docs/privacy.md invariant 9). ``images`` holds
# each picture's budget (keyed id ``im-...``, or ``set:<dataset_id>`` for a set whose pictures
# are not known yet), ``release_images`` the pictures each release is charged to,
# ``set_images`` which pictures make up a loaded set, ``image_looks`` a keyed perceptual hash
# per picture (near-copy warnings only). Only keyed values: nothing here identifies a picture
# without the ledger's key.
_PER_IMAGE_TABLES = """
CREATE TABLE images (
    image_id      TEXT PRIMARY KEY,
    epsilon_total REAL NOT NULL CHECK (epsilon_total > 0),
    delta_total   REAL NOT NULL CHECK (delta_total >= 0 AND delta_total < 1),
    created       TEXT NOT NULL,
    updated       TEXT NOT NULL
);
CREATE TABLE set_images (
    dataset_id TEXT NOT NULL,
    image_id   TEXT NOT NULL,
    PRIMARY KEY (dataset_id, image_id)
);
CREATE INDEX set_images_by_image ON set_images (image_id);
CREATE TABLE release_images (
    release_id INTEGER NOT NULL REFERENCES releases (id),
    image_id   TEXT NOT NULL,
    PRIMARY KEY (release_id, image_id)
);
CREATE INDEX release_images_by_image ON release_images (image_id);
CREATE TABLE image_looks (
    image_id TEXT PRIMARY KEY,
    look     TEXT NOT NULL
);
CREATE INDEX image_looks_by_look ON image_looks (look);
"""

FIX_PATH = "pass another file with --ledger or the DPAGG_LEDGER environment variable"


def _tighten(path: Path, mode: int, what: str) -> None:
    """Remove group/other permissions from ``path`` (a notice when it changed anything)."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
        if current & 0o077:
            os.chmod(path, current & mode)
            log.warning(
                "privacy ledger %s %s was readable by other users (mode %o); it is now %o. The "
                "ledger holds the key that identifies your private pictures: keep it private.",
                what,
                path,
                current,
                current & mode,
            )
    except FileNotFoundError:  # a journal that SQLite removed meanwhile
        return
    except OSError as exc:
        log.warning("could not make %s private (%s); make it readable by you only", path, exc)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def plan_from_json(text: str) -> PrivacyPlan:
    return PrivacyPlan(**json.loads(text))


class LedgerStore:
    """One ledger file: connections with a valid schema, the write transaction, row reads.

    Each :meth:`connect` opens its own connection, so a store (and the ``Ledger`` holding it) can
    be shared across threads and pickled into worker processes.
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._private = False

    def _make_private(self) -> None:
        """The ledger holds its identity key, so only its owner may read it (docs/privacy.md,
        "Who can read the ledger"): a new folder is created 0700 and a new file 0600 (SQLite
        gives its journal the database file's mode). An existing ledger readable by others is
        tightened once, with a notice; so is its folder when it is dpagg's own (the data dir,
        or a host's ``dpagg`` folder); a folder the user named is left as it is."""
        if self._private or os.name != "posix":
            return
        folder = self.path.parent
        if not folder.exists():
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        elif folder.name == HOST_SUBDIR or folder == data_dir():
            _tighten(folder, 0o700, "folder")
        try:
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            for suffix in ("", "-journal", "-wal", "-shm"):
                extra = self.path.with_name(self.path.name + suffix)
                if extra.exists():
                    _tighten(extra, 0o600, "file")
        self._private = True

    def error(self, exc: BaseException) -> LedgerError:
        msg = str(exc)
        name = getattr(exc, "sqlite_errorname", "")
        p = self.path
        if "locked" in msg or "busy" in msg or name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            text = (
                f"privacy ledger {p} is locked by another process for more than "
                f"{self.timeout:g} s ({msg}). No release was made. Fix: wait for the other dpagg "
                f"or ComfyUI run to finish and retry, or {FIX_PATH}."
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
                f"{FIX_PATH}."
            )
        elif isinstance(exc, OSError):
            text = (
                f"privacy ledger {p} cannot be created ({msg}). No release was made. Fix: make "
                f"{p.parent} writable, or {FIX_PATH}."
            )
        else:
            text = (
                f"privacy ledger {p} is corrupt or not a dpagg ledger ({msg}). No release was "
                f"made. Fix: move the file aside and restore a backup (keep it: it records the "
                f"budget already spent; a fresh ledger forgets it), or {FIX_PATH}."
            )
        return LedgerError(text)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """An autocommit connection (transactions are explicit) with a valid schema."""
        try:
            self._make_private()
            con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise self.error(exc) from exc
        try:
            con.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            con.execute("PRAGMA synchronous = FULL")
            con.execute("PRAGMA foreign_keys = ON")
            con.execute("PRAGMA secure_delete = ON")
            self._ensure_schema(con)
            yield con  # sqlite errors raised in the caller's block are mapped here too
        except sqlite3.Error as exc:
            raise self.error(exc) from exc
        finally:
            con.close()

    def _schema_state(self, con: sqlite3.Connection) -> str:
        """'ok', 'empty' (create it), 'v1' / 'v2' (migrate it), or raise LedgerError for a
        foreign or newer file."""
        version = con.execute("PRAGMA user_version").fetchone()[0]
        app_id = con.execute("PRAGMA application_id").fetchone()[0]
        tables = con.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id == 0 and version == 0 and tables == 0:
            return "empty"
        if app_id != APPLICATION_ID:
            raise LedgerError(
                f"{self.path} is an SQLite file but not a dpagg privacy ledger (application_id "
                f"{app_id:#x}). No release was made. Fix: {FIX_PATH}; do not point dpagg at "
                f"another program's database."
            )
        if version in (1, 2):
            return f"v{version}"
        if version != SCHEMA_VERSION:
            raise LedgerError(
                f"privacy ledger {self.path} has schema version {version}, this dpagg reads "
                f"version {SCHEMA_VERSION}. No release was made. Fix: use the dpagg version that "
                f"wrote it (upgrade dpagg), or {FIX_PATH}."
            )
        return "ok"

    def _ensure_schema(self, con: sqlite3.Connection) -> None:
        """Create the schema and the identity key in ONE write transaction (or migrate a v1
        ledger). Every other process waits on the write lock and re-checks, so concurrent first
        users all end up with the same, complete key; none can read a ledger without one."""
        with read_transaction(con):  # one consistent snapshot: another process may commit
            state = self._schema_state(con)  # the schema between two of these reads
        if state == "ok":
            return
        with write_transaction(con):
            state = self._schema_state(con)  # re-check under the write lock
            if state == "empty":
                for stmt in (_SCHEMA + _PER_IMAGE_TABLES).split(";"):
                    if stmt.strip():
                        con.execute(stmt)
                con.execute(
                    "INSERT INTO ledger_key (id, secret, origin, created) VALUES (1, ?, ?, ?)",
                    (secrets.token_bytes(KEY_BYTES), "created", now()),
                )
                con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif state in ("v1", "v2"):
                if state == "v1":
                    self._migrate_v1(con)
                self._migrate_v2(con)

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
            (secret, origin, now()),
        )
        rows = con.execute("SELECT id, request_key FROM releases").fetchall()
        for row_id, old in rows:
            base, sep, attempt = str(old).partition("#")
            con.execute(
                "UPDATE releases SET request_key = ? WHERE id = ?",
                (request_mac(secret, base) + sep + attempt, row_id),
            )
        con.execute("PRAGMA user_version = 2")
        log.info("privacy ledger %s upgraded to schema %d (%s key)", self.path, 2, origin)

    def _migrate_v2(self, con: sqlite3.Connection) -> None:
        """Schema 2 -> 3, inside the caller's write transaction: every recorded spend is kept.

        Schema 2 knew image sets, not pictures. Each recorded set becomes one charge unit
        ``set:<dataset_id>`` with the set's budget, charged with all of its releases; when the
        set's pictures are loaded again (``Ledger.register_set``) that history and budget are
        attached to each of its pictures and the unit disappears. Open reservations of schema 2
        have no owner, so they can never be completed: they stay spent and are never an answer.
        """
        for stmt in _PER_IMAGE_TABLES.split(";"):
            if stmt.strip():
                con.execute(stmt)
        con.execute("ALTER TABLE releases ADD COLUMN owner TEXT")
        con.execute(
            "INSERT INTO images (image_id, epsilon_total, delta_total, created, updated) "
            "SELECT ? || dataset_id, epsilon_total, delta_total, created, updated FROM datasets",
            (SET_UNIT_PREFIX,),
        )
        con.execute(
            "INSERT INTO release_images (release_id, image_id) "
            "SELECT id, ? || dataset_id FROM releases",
            (SET_UNIT_PREFIX,),
        )
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        log.info("privacy ledger %s upgraded to schema %d (per-image accounting)", self.path, 3)

    def secret(self, con: sqlite3.Connection) -> bytes:
        row = con.execute("SELECT secret FROM ledger_key WHERE id = 1").fetchone()
        secret = None if row is None else row[0]
        if not isinstance(secret, bytes) or len(secret) != KEY_BYTES:
            raise LedgerError(
                f"privacy ledger {self.path} has a missing or damaged identity key (expected "
                f"{KEY_BYTES} bytes, found "
                f"{'none' if secret is None else f'{type(secret).__name__} of {len(secret)}'}). "
                "Dataset ids cannot be computed safely, so nothing was released. Fix: restore the "
                f"ledger from a backup, or {FIX_PATH}."
            )
        return secret

    @staticmethod
    def upsert_budget(
        con: sqlite3.Connection, dataset_id: str, epsilon: float, delta: float
    ) -> None:
        """Set ``dataset_id``'s budget, creating its row if needed (caller holds the lock)."""
        stamp = now()
        con.execute(
            "INSERT INTO datasets (dataset_id, epsilon_total, delta_total, created, updated) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (dataset_id) DO UPDATE SET epsilon_total = "
            "excluded.epsilon_total, delta_total = excluded.delta_total, updated = "
            "excluded.updated",
            (dataset_id, epsilon, delta, stamp, stamp),
        )

    @staticmethod
    def budget(con: sqlite3.Connection, dataset_id: str) -> tuple[float, float] | None:
        row = con.execute(
            "SELECT epsilon_total, delta_total FROM datasets WHERE dataset_id = ?", (dataset_id,)
        ).fetchone()
        return None if row is None else (float(row[0]), float(row[1]))

    @staticmethod
    def units(con: sqlite3.Connection, dataset_id: str) -> list[str]:
        """The charge units of ``dataset_id``: its registered pictures, else the set itself
        (``set:<dataset_id>``: a set recorded before its pictures were known)."""
        rows = con.execute(
            "SELECT image_id FROM set_images WHERE dataset_id = ? ORDER BY image_id", (dataset_id,)
        ).fetchall()
        return [r[0] for r in rows] or [SET_UNIT_PREFIX + dataset_id]

    @staticmethod
    def unit_budgets(
        con: sqlite3.Connection, units: Sequence[str]
    ) -> dict[str, tuple[float, float]]:
        rows = con.execute(
            "SELECT image_id, epsilon_total, delta_total FROM images "
            "WHERE image_id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(units)),),
        ).fetchall()
        return {r[0]: (float(r[1]), float(r[2])) for r in rows}

    @staticmethod
    def unit_releases(con: sqlite3.Connection, units: Sequence[str]) -> dict[str, tuple[int, ...]]:
        """The release ids charged to each unit (units without any are left out)."""
        out: dict[str, list[int]] = {}
        for unit, rid in con.execute(
            "SELECT image_id, release_id FROM release_images "
            "WHERE image_id IN (SELECT value FROM json_each(?)) ORDER BY release_id",
            (json.dumps(list(units)),),
        ):
            out.setdefault(unit, []).append(int(rid))
        return {u: tuple(r) for u, r in out.items()}

    @staticmethod
    def upsert_unit_budget(
        con: sqlite3.Connection, unit: str, epsilon: float, delta: float
    ) -> None:
        """Set one picture's (unit's) budget, creating its row if needed (caller holds the
        lock)."""
        stamp = now()
        con.execute(
            "INSERT INTO images (image_id, epsilon_total, delta_total, created, updated) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (image_id) DO UPDATE SET epsilon_total = "
            "excluded.epsilon_total, delta_total = excluded.delta_total, updated = "
            "excluded.updated",
            (unit, epsilon, delta, stamp, stamp),
        )

    @staticmethod
    def plans_of(con: sqlite3.Connection, release_ids: Sequence[int]) -> list[PrivacyPlan]:
        """Recorded calls of the releases ``release_ids``: one plan per mechanism call, with the
        charged (epsilon, delta) as stored in the row. A charged (DP-SGD) row appears
        ``plan.releases`` times (:func:`calls_of_row`)."""
        plans = []
        for rid, plan_json, eps, delta, mode in con.execute(
            "SELECT id, plan, epsilon, delta, mode FROM releases "
            "WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id",
            (json.dumps([int(r) for r in release_ids]),),
        ):
            try:
                plan = plan_from_json(plan_json)
            except (TypeError, ValueError) as exc:
                raise LedgerError(
                    f"privacy ledger has an unreadable plan in release {rid} ({exc}); the ledger "
                    f"is corrupt. Fix: restore a backup, or {FIX_PATH}."
                ) from exc
            if plan.epsilon != eps or plan.delta != delta:
                raise LedgerError(
                    f"privacy ledger release {rid} is inconsistent (charged {eps}, {delta} vs "
                    f"plan {plan.epsilon}, {plan.delta}); the ledger is corrupt. Fix: restore a "
                    f"backup, or {FIX_PATH}."
                )
            plans.extend([as_replace_one(plan)] * calls_of_row(plan, mode))
        return plans

    def files(self, con: sqlite3.Connection) -> dict[int, list[str]]:
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


@contextmanager
def write_transaction(con: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back if the block raises: the one way the
    ledger writes. The write lock is taken before anything is read, so two processes cannot both
    see the same remaining budget."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
        con.execute("COMMIT")
    finally:
        if con.in_transaction:
            con.execute("ROLLBACK")


@contextmanager
def read_transaction(con: sqlite3.Connection) -> Iterator[None]:
    """A consistent read (``BEGIN`` ... ``ROLLBACK``): several SELECTs see one state."""
    con.execute("BEGIN")
    try:
        yield
    finally:
        if con.in_transaction:
            con.execute("ROLLBACK")


COLUMN_NAMES = (
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
COLUMNS = ", ".join(COLUMN_NAMES)


def row_dict(row: Sequence[Any], with_vectors: bool) -> dict[str, Any]:
    d = dict(zip(COLUMN_NAMES, row, strict=True))
    d["plan"] = json.loads(d["plan"])
    d["record"] = json.loads(d["record"]) if d["record"] is not None else None
    d["item_shape"] = json.loads(d["item_shape"])
    d["complete"] = d["vector"] is not None  # False: charged (spent) but no result stored
    if with_vectors:
        d["vector"] = None if d["vector"] is None else vector_of(d["vector"], d["item_shape"])
    else:
        del d["vector"]
    return d


def vector_of(blob: bytes, item_shape: list[int]) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f8").astype(np.float64).reshape(item_shape)


def make_release(vector_blob: bytes, record_json: str, item_shape: str) -> mechanism.Release:
    vector = vector_of(vector_blob, json.loads(item_shape))
    return mechanism.Release(vector=vector, record=json.loads(record_json))
