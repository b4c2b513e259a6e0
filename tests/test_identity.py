"""One dataset identity per ledger; stored keys and private files that cannot confirm a guess.

Regression tests for docs/privacy.md "One identity per ledger" and "Keyed values": before
schema 2, the key behind dataset ids was a salt in the data dir, request keys were unkeyed
digests of the per-image embeddings, and private files carried a plain SHA-256.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from identity_worker import key_worker

from dpagg_core.aggregate.release import release_vectors
from dpagg_core.errors import DpaggError, LedgerError
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.io.images import dataset_id_for
from dpagg_core.io.private_file import load_private, save_private
from dpagg_core.privacy.accountant import PrivacyPlan
from dpagg_core.privacy.calibration import calibrate
from dpagg_core.privacy.ledger import KEY_BYTES, SCHEMA_VERSION, Ledger
from dpagg_core.privacy.request_keys import request_key

V1 = Path(__file__).parent / "data" / "ledger_v1"
DIGESTS = [b"image-one", b"image-two", b"image-three"]

_ID_SCRIPT = """
import sys
from dpagg_core.privacy.ledger import Ledger
print(Ledger(sys.argv[1]).dataset_id([b"image-one", b"image-two", b"image-three"]))
"""


def _id_in_process(ledger: Path, data_dir: Path, home: Path) -> str:
    env = {**os.environ, "DPAGG_DATA_DIR": str(data_dir), "HOME": str(home)}
    env.pop("DPAGG_LEDGER", None)
    out = subprocess.run(
        [sys.executable, "-c", _ID_SCRIPT, str(ledger)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return out.stdout.strip()


def test_processes_with_different_data_dirs_share_one_identity(tmp_path):
    """Another OS user, a container without a persistent home, a deleted salt file: as long as the
    ledger is the same file, the same pictures are the same dataset (one budget)."""
    ledger = tmp_path / "shared" / "ledger.sqlite"
    first = _id_in_process(ledger, tmp_path / "data-a", tmp_path / "home-a")
    second = _id_in_process(ledger, tmp_path / "data-b", tmp_path / "home-b")
    assert first.startswith("ds-") and first == second
    # ... and a different ledger is a different identity space.
    assert _id_in_process(tmp_path / "other.sqlite", tmp_path / "data-a", tmp_path / "h") != first
    # Nothing is written to the data dirs any more.
    assert not (tmp_path / "data-a" / "salt").exists()
    assert not (tmp_path / "data-b" / "salt").exists()


def test_concurrent_first_use_sees_one_complete_key(tmp_path):
    """Several processes opening a fresh ledger at the same moment (torchrun ranks, ComfyUI plus
    the CLI) all get the same 32-byte key; none sees a ledger without one.

    Fresh processes, not forks of this one: a fork server that has imported only the ledger (no
    torch) forks each worker, which then imports the light ``identity_worker``; 18 workers cost
    one import, not 18. (Python 3.11's fork server ignores sys.path, so it cannot preload
    tests/identity_worker.py itself.)"""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["dpagg_core.privacy.ledger"])
    for trial in range(3):
        path = str(tmp_path / f"fresh-{trial}.sqlite")
        workers = 6
        barrier, queue = ctx.Barrier(workers), ctx.Queue()
        procs = [ctx.Process(target=key_worker, args=(path, barrier, queue)) for _ in range(6)]
        for p in procs:
            p.start()
        keys = [queue.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert len(set(keys)) == 1, keys
        key = bytes.fromhex(keys[0])
        assert len(key) == KEY_BYTES and key != bytes(KEY_BYTES)


def _damage_key(path: Path, value: object) -> None:
    con = sqlite3.connect(path)
    con.execute("PRAGMA ignore_check_constraints = ON")
    con.execute("UPDATE ledger_key SET secret = ? WHERE id = 1", (value,))
    con.commit()
    con.close()


@pytest.mark.parametrize("value", [b"", b"short", "a" * 32, None])
def test_damaged_key_is_an_error_never_used(tmp_path, value):
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.identity_key()
    if value is None:
        con = sqlite3.connect(ledger.path)
        con.execute("DELETE FROM ledger_key")
        con.commit()
        con.close()
    else:
        _damage_key(ledger.path, value)
    with pytest.raises(LedgerError, match="identity key"):
        ledger.identity_key()
    with pytest.raises(LedgerError, match="identity key"):
        ledger.dataset_id(DIGESTS)


def test_dataset_id_needs_a_real_key():
    with pytest.raises(DpaggError, match="32 bytes"):
        dataset_id_for(DIGESTS, key=b"")
    with pytest.raises(TypeError):
        dataset_id_for(DIGESTS)  # type: ignore[call-arg]


# ---- migration of a ledger written by dpagg at 9d699ea (schema 1) ---------------------------


def _copy_v1(tmp_path: Path, monkeypatch, *, salt: str | None = "keep") -> tuple[Ledger, dict]:
    shutil.copytree(V1, tmp_path / "v1")
    data = tmp_path / "v1" / "data"
    if salt is None:
        (data / "salt").unlink()
    elif salt != "keep":
        (data / "salt").write_text(salt)
    monkeypatch.setenv("DPAGG_DATA_DIR", str(data))
    expected = json.loads((V1 / "expected.json").read_text())
    return Ledger(tmp_path / "v1" / "ledger.sqlite"), expected


def test_v1_ledger_migrates_once_keeping_ids_budgets_and_reuse(tmp_path, monkeypatch):
    ledger, expected = _copy_v1(tmp_path, monkeypatch)
    raw_before = ledger.path.read_bytes()
    assert expected["request_digest"].encode() in raw_before  # the unkeyed digest, stored in v1

    assert ledger.dataset_id(DIGESTS) == expected["dataset_id"]  # the salt became the key
    con = sqlite3.connect(ledger.path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert con.execute("SELECT origin FROM ledger_key").fetchone()[0] == "adopted-install-salt"
    keys = [r[0] for r in con.execute("SELECT request_key FROM releases ORDER BY id")]
    con.close()
    salt = bytes.fromhex((tmp_path / "v1" / "data" / "salt").read_text())

    def mac(d: str) -> str:
        return hmac.new(salt, b"dpagg-request/2\x00" + d.encode(), hashlib.sha256).hexdigest()

    assert keys == [
        mac(expected["request_digest"]),
        mac(expected["charge_digest"]),
        mac(expected["charge_digest"]) + "#2",
    ]
    raw_after = ledger.path.read_bytes()
    for digest in (expected["request_digest"], expected["charge_digest"]):
        assert digest.encode() not in raw_after  # overwritten (secure_delete), not just unlinked

    status = ledger.status(expected["dataset_id"])
    assert status["spent"]["epsilon"] > 0 and status["budget"]["epsilon"] == 3.0
    # The identical request recorded under v1 is answered from the ledger, not spent again.
    again = release_vectors(
        ledger,
        np.load(V1 / "vectors.npy"),
        dataset_id=expected["dataset_id"],
        plan=PrivacyPlan(**expected["plan"]),
        clip_norm=1.0,
        centre_kind="origin",
        name="v1style",
        base_model_id="tiny",
    )
    assert again.reused and again.release_id == expected["release_id"]
    np.testing.assert_array_equal(again.release.vector, expected["vector"])
    # Opening again changes nothing (migrated once).
    assert ledger.path.read_bytes() == raw_after


def test_v1_ledger_without_its_salt_is_not_silently_reset(tmp_path, monkeypatch):
    ledger, _ = _copy_v1(tmp_path, monkeypatch, salt=None)
    before = ledger.path.read_bytes()
    with pytest.raises(LedgerError, match="DPAGG_DATA_DIR"):
        ledger.identity_key()
    assert ledger.path.read_bytes() == before  # still schema 1, untouched


@pytest.mark.parametrize("salt", ["", "abc", "zz" * 32])
def test_v1_ledger_with_a_damaged_salt_is_refused(tmp_path, monkeypatch, salt):
    ledger, _ = _copy_v1(tmp_path, monkeypatch, salt=salt)
    with pytest.raises(DpaggError, match="empty or damaged"):
        ledger.identity_key()


def test_empty_v1_ledger_without_salt_gets_a_fresh_key(tmp_path, monkeypatch):
    ledger, _ = _copy_v1(tmp_path, monkeypatch, salt=None)
    con = sqlite3.connect(ledger.path)
    con.execute("DELETE FROM releases")
    con.execute("DELETE FROM datasets")
    con.commit()
    con.close()
    assert len(ledger.identity_key()) == KEY_BYTES


# ---- stored keys are MACs --------------------------------------------------------------------


def _release(ledger: Ledger, vecs: np.ndarray, ds: str):
    plan = calibrate(1.0, delta=1e-5, n=len(vecs), sampling="full")
    args = dict(dataset_id=ds, plan=plan, clip_norm=1.0, centre_kind="origin", mode="clip")
    out = release_vectors(ledger, vecs, name="s", base_model_id="m", **args)
    digest = request_key(vecs, center=None, name="s", base_model_id="m", **args)
    return out, digest


def test_stored_request_key_cannot_confirm_a_guess(tmp_path):
    """Someone reading the ledger who retrains embeddings from guessed images can compute the
    unkeyed digest; it must not appear in the ledger or in `ledger show --json`."""
    vecs = np.random.default_rng(1).normal(size=(5, 3))
    a, b = Ledger(tmp_path / "a.sqlite"), Ledger(tmp_path / "b.sqlite")
    out_a, digest = _release(a, vecs, "ds-x")
    out_b, _ = _release(b, vecs, "ds-x")
    stored_a = a.get_release(out_a.release_id)["request_key"]
    stored_b = b.get_release(out_b.release_id)["request_key"]
    assert digest not in (stored_a, stored_b)
    assert digest.encode() not in a.path.read_bytes()
    assert stored_a == a.request_mac(digest) and stored_b == b.request_mac(digest)
    assert stored_a != stored_b  # keyed per ledger
    shown = json.dumps(a.list_releases(with_vectors=True), default=lambda o: o.tolist())
    assert digest not in shown


# ---- authenticated private files -------------------------------------------------------------


def _eset(key: bytes, seed: int = 0) -> EmbeddingSet:
    gen = torch.Generator().manual_seed(seed)
    return EmbeddingSet(
        vectors={"emb_params": torch.randn(4, 1, 8, generator=gen)},
        kind="textual_inversion",
        model_family="sd1",
        base_model_id="tiny",
        centre={"emb_params": torch.zeros(1, 8)},
        initializer="painting",
        dataset_id=dataset_id_for(DIGESTS, key=key),
    )


def _rewrite(path: Path, out: Path, *, meta: dict | None = None, scale: float = 1.0) -> Path:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        old = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: v * scale if k.startswith("per_image") else v for k, v in tensors.items()}
    out.write_bytes(safetensors.torch.save(tensors, metadata={**old, **(meta or {})}))
    return out


def test_private_file_is_authenticated_by_the_ledger_key(tmp_path):
    key = Ledger(tmp_path / "l.sqlite").identity_key()
    path = save_private(_eset(key), tmp_path / "priv" / "set.safetensors", key=key)
    back = load_private(path, key=key)
    assert back.dataset_id == _eset(key).dataset_id
    torch.testing.assert_close(back.vectors["emb_params"], _eset(key).vectors["emb_params"])

    relabelled = _rewrite(
        path,
        tmp_path / "priv" / "relabelled.safetensors",
        meta={
            "dataset_id": "ds-" + "0" * 32,
        },
    )
    edited = _rewrite(path, tmp_path / "priv" / "edited.safetensors", scale=1.001)
    for bad in (relabelled, edited):
        with pytest.raises(DpaggError, match="authentication"):
            load_private(bad, key=key)
    other_key = Ledger(tmp_path / "other.sqlite").identity_key()
    with pytest.raises(DpaggError, match="another privacy ledger"):
        load_private(path, key=other_key)
    old_format = _rewrite(
        path,
        tmp_path / "priv" / "old.safetensors",
        meta={
            "format": "dpagg-private/1",
            "integrity_sha256": "0" * 64,
        },
    )
    with pytest.raises(DpaggError, match="older dpagg"):
        load_private(old_format, key=key)


# ---- the canonical decode replaced dpagg <= 0.2's: recorded budgets follow the pictures -----


def test_budget_recorded_under_the_old_decode_follows_the_pictures(tmp_path):
    """Semi-transparent and 16-bit images decode differently now (as ComfyUI's Load Image does),
    so their id changed; a release recorded under the old id must still count."""
    from PIL import Image

    from dpagg_core.io import images

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(3, 24, 24, 4), dtype=np.uint8)
    rgba[..., 3] = 128  # semi-transparent: composited over white before, alpha dropped now
    for i, a in enumerate(rgba):
        Image.fromarray(a, mode="RGBA").save(folder / f"{i}.png")
    gray16 = (rng.integers(0, 65536, size=(24, 24))).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "g.png")
    ledger = Ledger(tmp_path / "l.sqlite")
    key = ledger.identity_key()
    old_digests = [images._legacy_digest(Image.open(p)) for p in sorted(folder.iterdir())]
    assert all(d is not None for d in old_digests)
    old_id = dataset_id_for(old_digests, key=key)
    vecs = np.zeros((4, 3))
    plan = calibrate(1.0, delta=1e-5, n=4, sampling="full")
    release_vectors(
        ledger, vecs, dataset_id=old_id, plan=plan, clip_norm=1.0, name="x", budget_epsilon=1.2
    )

    loaded = images.load_image_folder(folder, 16, ledger=ledger.path)
    assert loaded.dataset_id != old_id
    status = ledger.status(loaded.dataset_id)
    assert status["releases"] == 1 and status["budget"]["epsilon"] == 1.2
    assert ledger.status(old_id)["releases"] == 0
    # The moved spend is enforced: a second epsilon-1 release exceeds the budget of 1.2 (PLD: 1.45).
    with pytest.raises(DpaggError, match="budget"):
        release_vectors(
            ledger, vecs + 1, dataset_id=loaded.dataset_id, plan=plan, clip_norm=1.0, name="y"
        )
    # Loading again changes nothing.
    before = ledger.path.read_bytes()
    assert images.load_image_folder(folder, 16, ledger=ledger.path).dataset_id == loaded.dataset_id
    assert ledger.path.read_bytes() == before
