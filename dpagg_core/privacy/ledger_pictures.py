"""The ledger's pictures: which pictures make up an image set, their keyed perceptual hashes, and
the questions asked about them (is this picture private? a near copy of a charged one?). The SQL
behind :meth:`Ledger.register_set <dpagg_core.privacy.ledger.Ledger.register_set>`,
``adopt_dataset``, ``private_pictures``, ``private_looks`` and ``has_unregistered_sets``; the
:class:`~dpagg_core.privacy.ledger.Ledger` keeps the public methods (argument checks,
connection, log lines) and calls these with its store and an open connection.

Tables (``dpagg_core.privacy.ledger_store``): ``set_images`` (set -> picture), ``image_looks``
(picture -> keyed perceptual hash), ``release_images`` (release -> charged unit: a picture, or
``set:<dataset_id>`` for a set whose pictures were never registered), ``images`` (unit budgets).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence

from dpagg_core.privacy.identity import set_unit
from dpagg_core.privacy.ledger_store import LedgerStore, write_transaction


def adopt(store: LedgerStore, con: sqlite3.Connection, old_id: str, new_id: str) -> bool:
    """Move everything recorded for ``old_id`` to ``new_id`` in one write transaction (the rules
    are :meth:`Ledger.adopt_dataset`'s); True if anything moved. Takes the write lock only when
    ``old_id``'s unit exists."""
    old_unit, new_unit = set_unit(old_id), set_unit(new_id)
    if not store.unit_budgets(con, [old_unit]):  # the usual case: no write lock
        return False
    with write_transaction(con):
        old = store.unit_budgets(con, [old_unit]).get(old_unit)
        if old is None:
            return False
        new = store.unit_budgets(con, [new_unit]).get(new_unit)
        eps, delta = old if new is None else (min(old[0], new[0]), min(old[1], new[1]))
        store.upsert_unit_budget(con, new_unit, eps, delta)
        store.upsert_budget(con, new_id, eps, delta)
        con.execute("UPDATE releases SET dataset_id = ? WHERE dataset_id = ?", (new_id, old_id))
        con.execute(
            "UPDATE release_images SET image_id = ? WHERE image_id = ?", (new_unit, old_unit)
        )
        con.execute("DELETE FROM images WHERE image_id = ?", (old_unit,))
        con.execute("DELETE FROM datasets WHERE dataset_id = ?", (old_id,))
    return True


def register(
    store: LedgerStore,
    con: sqlite3.Connection,
    dataset_id: str,
    sets: Mapping[str, list[str]],
    looks: Mapping[str, str],
) -> list[str]:
    """Record the pictures of ``sets`` (``dataset_id`` and its candidates) and their ``looks``,
    charging each set unit's releases and budget to its pictures; writes (one transaction) only
    when something is new. Returns the sets whose unit was attached (for the log)."""
    if not registration_needed(store, con, sets, dataset_id, looks):
        return []
    attached = []
    with write_transaction(con):
        for sid, sids in sets.items():
            if attach_locked(store, con, sid, sids, register=sid == dataset_id):
                attached.append(sid)
        con.executemany(
            "INSERT OR IGNORE INTO image_looks (image_id, look) VALUES (?, ?)",
            list(looks.items()),
        )
    return attached


def registration_needed(
    store: LedgerStore,
    con: sqlite3.Connection,
    sets: Mapping[str, list[str]],
    dataset_id: str,
    looks: Mapping[str, str],
) -> bool:
    units = [set_unit(sid) for sid in sets]
    if store.unit_budgets(con, units) or store.unit_releases(con, units):
        return True
    known = {
        r[0]
        for r in con.execute("SELECT image_id FROM set_images WHERE dataset_id = ?", (dataset_id,))
    }
    if known != set(sets[dataset_id]):
        return True
    if looks:
        have = con.execute(
            "SELECT count(*) FROM image_looks WHERE image_id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(looks)),),
        ).fetchone()[0]
        return int(have) != len(looks)
    return False


def attach_locked(
    store: LedgerStore, con: sqlite3.Connection, dataset_id: str, ids: list[str], *, register: bool
) -> bool:
    """Charge ``dataset_id``'s set unit's releases and budget to each picture of ``ids`` (inside
    the caller's write transaction); True when a unit was attached."""
    unit = set_unit(dataset_id)
    unit_budget = store.unit_budgets(con, [unit]).get(unit)
    rids = store.unit_releases(con, [unit]).get(unit, ())
    if not register and unit_budget is None and not rids:
        return False
    con.executemany(
        "INSERT OR IGNORE INTO set_images (dataset_id, image_id) VALUES (?, ?)",
        [(dataset_id, i) for i in ids],
    )
    if unit_budget is None and not rids:
        return False
    con.executemany(
        "INSERT OR IGNORE INTO release_images (release_id, image_id) VALUES (?, ?)",
        [(r, i) for r in rids for i in ids],
    )
    if unit_budget is not None:
        have = store.unit_budgets(con, ids)
        for i in ids:
            cur = have.get(i)
            eps, delta = (
                unit_budget
                if cur is None
                else (min(cur[0], unit_budget[0]), min(cur[1], unit_budget[1]))
            )
            store.upsert_unit_budget(con, i, eps, delta)
    con.execute("DELETE FROM release_images WHERE image_id = ?", (unit,))
    con.execute("DELETE FROM images WHERE image_id = ?", (unit,))
    return True


def near_copies(
    store: LedgerStore, con: sqlite3.Connection, image_ids: Sequence[str], looks: Sequence[str]
) -> list[int]:
    """Indices of pictures new to the ledger whose look matches a picture charged with a
    release (:meth:`Ledger.register_set`)."""
    if not looks:
        return []
    charged = set(store.unit_releases(con, list(image_ids)))
    fresh = [i for i, im in enumerate(image_ids) if im not in charged]
    if not fresh:
        return []
    rows = con.execute(
        "SELECT DISTINCT l.look FROM image_looks l JOIN release_images r "
        "ON r.image_id = l.image_id WHERE l.look IN (SELECT value FROM json_each(?)) "
        "AND l.image_id NOT IN (SELECT value FROM json_each(?))",
        (json.dumps([looks[i] for i in fresh]), json.dumps(list(image_ids))),
    ).fetchall()
    seen = {r[0] for r in rows}
    return [i for i in fresh if looks[i] in seen]


def private_picture_indices(con: sqlite3.Connection, image_ids: Sequence[str]) -> list[int]:
    """Indices of ``image_ids`` in a loaded private set or charged with a release."""
    ids = list(image_ids)
    known = {
        r[0]
        for r in con.execute(
            "SELECT image_id FROM set_images WHERE image_id IN (SELECT value FROM "
            "json_each(?)) UNION SELECT image_id FROM release_images WHERE image_id IN "
            "(SELECT value FROM json_each(?))",
            (json.dumps(ids), json.dumps(ids)),
        )
    }
    return [i for i, im in enumerate(ids) if im in known]


def private_look_indices(con: sqlite3.Connection, looks: Sequence[str]) -> list[int]:
    """Indices of ``looks`` that match a private picture's keyed perceptual hash."""
    known = {
        r[0]
        for r in con.execute(
            "SELECT look FROM image_looks WHERE look IN (SELECT value FROM json_each(?))",
            (json.dumps(list(looks)),),
        )
    }
    return [i for i, lk in enumerate(looks) if lk in known]


def any_unregistered_set(con: sqlite3.Connection) -> bool:
    """Whether a recorded set is still charged as a whole (a ``set:`` unit exists)."""
    row = con.execute(
        "SELECT 1 FROM images WHERE substr(image_id, 1, ?) = ? LIMIT 1",
        (len(set_unit("")), set_unit("")),
    ).fetchone()
    return row is not None
