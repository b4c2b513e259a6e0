"""Per-picture accounting (docs/privacy.md invariant 9; issue 18 item 1).

Real picture files through the real loader (which registers each set's pictures with the ledger),
real SQLite ledgers, real processes racing. "Nothing drawn" is asserted by counting calls of
``mechanism.dp_mean``. Plans are 'full' Gaussian plans from the calibrator, composed by PLD.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import sqlite3
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpagg_core.aggregate.release import release_vectors
from dpagg_core.errors import BudgetExceeded, DpaggError
from dpagg_core.io.images import load_image_folder, load_images
from dpagg_core.privacy import ledger as ledger_mod
from dpagg_core.privacy import mechanism
from dpagg_core.privacy.calibration import calibrate
from dpagg_core.privacy.composition import REL_TOL, composed_spend
from dpagg_core.privacy.ledger import Ledger

DELTA = 1e-5
V2 = Path(__file__).parent / "data" / "ledger_v2"
_FORK = multiprocessing.get_context("fork")


@pytest.fixture
def draws(monkeypatch) -> list[int]:
    """Counts the noise draws (``mechanism.dp_mean`` calls); the data dir and ledger of each test
    are its own (conftest)."""
    calls: list[int] = []
    real = mechanism.dp_mean
    monkeypatch.setattr(mechanism, "dp_mean", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def pictures(root: Path, count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8), mode="RGB")
        for _ in range(count)
    ]


def folder(root: Path, name: str, pics: list[Image.Image]) -> Path:
    out = root / name
    out.mkdir(parents=True)
    for i, pic in enumerate(pics):
        pic.save(out / f"{name}-{i}.png")
    return out


def plan_for(n: int, epsilon: float):
    return calibrate(epsilon, delta=DELTA, n=n, sampling="full")


def release(led: Ledger, loaded, epsilon: float, name: str, **kw):
    vecs = np.random.default_rng(len(name)).normal(size=(loaded.count, 4))
    return release_vectors(
        led,
        vecs,
        dataset_id=loaded.dataset_id,
        plan=plan_for(loaded.count, epsilon),
        clip_norm=1.0,
        name=name,
        **kw,
    )


def load(path: Path, led: Ledger):
    return load_image_folder(path, 8, ledger=led.path)


@pytest.fixture
def sets(tmp_path):
    """A (6 pictures), A plus one, A minus one, a half-overlap of A, and a disjoint set."""
    base = pictures(tmp_path, 6, seed=1)
    new = pictures(tmp_path, 4, seed=2)
    return {
        "A": folder(tmp_path, "A", base),
        "A+1": folder(tmp_path, "Aplus", [*base, new[0]]),
        "A-1": folder(tmp_path, "Aminus", base[:-1]),
        "half": folder(tmp_path, "half", [*base[:3], *new[1:]]),
        "B": folder(tmp_path, "B", new),
    }


def test_an_exhausted_set_plus_or_minus_one_picture_is_refused(tmp_path, sets, draws):
    led = Ledger(tmp_path / "ledger.sqlite")
    a = load(sets["A"], led)
    release(led, a, 1.0, "a1", budget_epsilon=1.0, budget_delta=DELTA)
    with pytest.raises(BudgetExceeded):
        release(led, a, 0.5, "a2")
    before = len(draws)
    for key in ("A+1", "A-1"):
        other = load(sets[key], led)
        assert other.dataset_id != a.dataset_id  # a different set, the same pictures
        with pytest.raises(BudgetExceeded, match="pictures of image set") as err:
            release(led, other, 1.0, f"{key}-try")
        assert "No noise was drawn" in str(err.value)
        st = led.status(other.dataset_id)
        assert st["remaining"]["epsilon"] <= 1e-6 and st["releases"] == 1
    assert len(draws) == before  # refused before any noise
    # A disjoint set keeps its own, fresh budget.
    b = load(sets["B"], led)
    assert not release(led, b, 1.0, "b1").reused
    assert led.status(b.dataset_id)["releases"] == 1


def test_a_half_overlapping_set_is_charged_on_the_shared_pictures(tmp_path, sets):
    led = Ledger(tmp_path / "ledger.sqlite")
    a, half, b = load(sets["A"], led), load(sets["half"], led), load(sets["B"], led)
    one = plan_for(6, 1.0)
    three = composed_spend([one] * 3, 1e-3).epsilon  # a budget that admits exactly 3 releases
    assert composed_spend([one] * 4, 1e-3).epsilon > three * (1 + REL_TOL)
    release(led, a, 1.0, "a1", budget_epsilon=three, budget_delta=1e-3)
    release(led, half, 1.0, "h1")  # new pictures take the set's recorded budget
    two = composed_spend([one, one], 1e-3).epsilon
    for ds in (a.dataset_id, half.dataset_id):  # worst picture: a shared one, two releases
        st = led.status(ds)
        assert st["spent"]["epsilon"] == pytest.approx(two, rel=1e-6)
        assert st["budget"]["epsilon"] == three and st["releases"] == 2
    assert led.status(a.dataset_id)["shared"]  # its worst pictures took part in "half" too
    # B holds three of half's new pictures (one release) and one never released picture.
    assert led.status(b.dataset_id)["spent"]["epsilon"] == pytest.approx(
        composed_spend([one], 1e-3).epsilon, rel=1e-6
    )
    release(led, a, 1.0, "a2")  # shared pictures: three releases, still within budget
    with pytest.raises(BudgetExceeded, match="overlapping image sets"):
        release(led, half, 1.0, "h2")  # the shared pictures would need a fourth
    # Half's own new pictures still have room: a set of only them is admitted.
    only_new = load_images([Image.open(p) for p in sorted(sets["half"].iterdir())[3:]], 8,
                           ledger=led.path)  # fmt: skip
    assert not release(led, only_new, 1.0, "new-only").reused


def test_set_budget_applies_to_each_picture_and_never_below_spent(tmp_path, sets):
    led = Ledger(tmp_path / "ledger.sqlite")
    a, minus = load(sets["A"], led), load(sets["A-1"], led)
    release(led, a, 1.0, "a1")
    with pytest.raises(BudgetExceeded, match="cannot set the budget"):
        led.set_budget(minus.dataset_id, 0.5, DELTA)
    led.set_budget(minus.dataset_id, 5.0, DELTA)  # five of A's six pictures
    # A's worst picture (the sixth) still has the budget of its first release.
    assert led.status(a.dataset_id)["budget"]["epsilon"] == pytest.approx(1.0)
    assert not release(led, minus, 1.0, "m1").reused


def smooth(count: int, seed: int) -> list[Image.Image]:
    """Pictures with structure (3 x 3 random colours, smoothly enlarged), like real artwork
    rather than noise."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, size=(3, 3, 3), dtype=np.uint8), mode="RGB").resize(
            (64, 64), Image.Resampling.BILINEAR
        )
        for _ in range(count)
    ]


def test_a_resized_copy_of_a_released_picture_gets_a_warning(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    originals = smooth(4, seed=3)
    release(led, load(folder(tmp_path, "orig", originals), led), 1.0, "a1")
    first = originals[3]  # a non-trivial hash (0 and 2 are plain gradients)
    copy = tmp_path / "copy"
    copy.mkdir()
    first.resize((48, 48), Image.Resampling.LANCZOS).save(copy / "copy-0.jpg", quality=90)
    for i, pic in enumerate(smooth(2, seed=11), start=1):
        pic.save(copy / f"copy-{i}.png")
    loaded = load(copy, led)
    near = [w for w in loaded.warnings if "look like pictures already released" in w]
    assert len(near) == 1 and "copy-0.jpg" in near[0] and "copy-1.png" not in near[0]
    # The look is stored keyed: the raw perceptual hash appears nowhere in the file.
    from dpagg_core.io.images import look_of

    assert look_of(first) not in led.path.read_bytes()
    assert look_of(first).hex().encode() not in led.path.read_bytes()


def test_public_loads_refuse_private_pictures_and_do_not_register(tmp_path, sets):
    led = Ledger(tmp_path / "ledger.sqlite")
    load(sets["A"], led)
    mixed = folder(tmp_path, "public", [Image.open(sorted(sets["A"].iterdir())[2]),
                                        *pictures(tmp_path, 3, seed=5)])  # fmt: skip
    with pytest.raises(DpaggError, match="recorded as PRIVATE") as err:
        load_image_folder(mixed, 8, ledger=led.path, public=True)
    assert "public-0.png" in str(err.value) and "public-1.png" not in str(err.value)
    clean = load_image_folder(sets["B"], 8, ledger=led.path, public=True)
    # Not registered: B's pictures are still unknown, so a private load of B is a fresh set.
    con = sqlite3.connect(led.path)
    assert con.execute(
        "SELECT count(*) FROM set_images WHERE dataset_id = ?", (clean.dataset_id,)
    ).fetchone() == (0,)


def test_multi_frame_files_are_refused_everywhere(tmp_path):
    out = tmp_path / "anim"
    out.mkdir()
    frames = pictures(tmp_path, 3, seed=4)
    frames[0].save(out / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(out / "still.png")
    frames[1].save(out / "still2.png")
    with pytest.raises(DpaggError, match="anim.gif has 3 frames"):
        load_image_folder(out, 8)
    with pytest.raises(DpaggError, match="image 0 has 3 frames"):
        load_images([Image.open(out / "anim.gif"), frames[1]], 8)
    (out / "anim.gif").unlink()
    assert load_image_folder(out, 8).count == 2


def test_only_the_reserving_reservation_completes_an_orphan_stays_spent(tmp_path, sets, draws):
    led = Ledger(tmp_path / "ledger.sqlite")
    a = load(sets["A"], led)
    from dpagg_core.privacy.request_keys import aggregate_request

    vecs = np.zeros((a.count, 4))
    request = aggregate_request(vecs, dataset_id=a.dataset_id, plan=plan_for(6, 0.5),
                                clip_norm=1.0, center=None, centre_kind="origin", mode="clip",
                                name="orphan", budget_epsilon=2.0)  # fmt: skip
    r = led.reserve(request)  # the reserving process "dies" here: r is never completed
    for token in ("", "0" * 64, "guess"):
        with pytest.raises(DpaggError, match="reserved by another reservation"):
            led._complete(r.release_id, token, np.ones(4), {"a": "b"})
    assert not led.get_release(r.release_id)["complete"]
    again = led.reserve(request)  # never answered from the orphan: charged again
    assert not again.reused and again.attempt == 2
    done = again.complete(np.ones(4), {"a": "b"})
    assert not done.reused and led.status(a.dataset_id)["incomplete"] == 1


def _v2_copy(tmp_path: Path) -> tuple[Ledger, dict]:
    dst = tmp_path / "v2"
    shutil.copytree(V2, dst)
    return Ledger(dst / "ledger.sqlite"), json.loads((V2 / "expected.json").read_text())


def test_v2_ledger_keeps_every_spend_when_its_pictures_are_loaded(tmp_path):
    led, expected = _v2_copy(tmp_path)
    all5, first3 = expected["all5"], expected["first3"]
    st = led.status(all5["dataset_id"])  # migrated: the set is one unit until loaded
    assert st["spent"]["epsilon"] == pytest.approx(all5["spent"])
    assert st["budget"]["epsilon"] == pytest.approx(all5["budget"])
    con = sqlite3.connect(led.path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 3
    con.close()
    loaded = load(led.path.parent / "images", led)
    assert loaded.dataset_id == all5["dataset_id"]
    con = sqlite3.connect(led.path)
    assert con.execute("SELECT count(*) FROM images WHERE image_id LIKE 'set:%'").fetchone() == (
        1,  # first3's unit: its pictures are not loaded yet
    )
    con.close()
    with pytest.raises(BudgetExceeded):
        release(led, loaded, 0.5, "again")
    # A subset of the recorded set (never recorded itself) is charged with its history.
    subset = folder(tmp_path, "subset", [Image.open(led.path.parent / "images" / f"p{i}.png")
                                         for i in (0, 3)])  # fmt: skip
    with pytest.raises(BudgetExceeded):
        release(led, load(subset, led), 0.5, "subset")
    # first3 attaches too once loaded; its pictures now carry both histories and budget 1.
    three = load(led.path.parent / "first3", led)
    st3 = led.status(three.dataset_id)
    assert st3["releases"] == 2 and st3["budget"]["epsilon"] == pytest.approx(1.0)
    assert led.status(first3["dataset_id"])["spent"]["epsilon"] >= first3["spent"]


def test_v2_set_loaded_with_one_more_picture_is_still_charged(tmp_path):
    led, expected = _v2_copy(tmp_path)
    pics = [Image.open(p) for p in sorted((led.path.parent / "images").iterdir())]
    plus = folder(tmp_path, "plus", [*pics, *pictures(tmp_path, 1, seed=8)])
    loaded = load(plus, led)  # the exact recorded set was never loaded: matched minus one
    with pytest.raises(BudgetExceeded):
        release(led, loaded, 0.5, "plus")
    assert led.status(loaded.dataset_id)["releases"] == 1


def _race(path: str, folder_path: str, tag: str, go, attempts: int) -> list[str]:
    ledger_mod._before_commit_hook = lambda: time.sleep(0.03)
    led = Ledger(path)
    loaded = load_image_folder(folder_path, 8, ledger=path)
    go.wait(30)
    out = []
    for j in range(attempts):
        try:
            release(led, loaded, 0.4, f"{tag}-{j}")
            out.append("ok")
        except BudgetExceeded:
            out.append("refused")
    return out


def _start(fn, *args):
    recv, send = _FORK.Pipe(duplex=False)

    def target():
        try:
            send.send(("ok", fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            send.send(("error", f"{type(exc).__name__}: {exc}"))

    proc = _FORK.Process(target=target, daemon=True)
    proc.start()
    return proc, recv


def test_processes_releasing_overlapping_sets_never_exceed_any_picture(tmp_path, sets):
    path = tmp_path / "ledger.sqlite"
    led = Ledger(path)
    for key in ("A", "A+1", "A-1", "half"):  # budgets: epsilon 1 for every picture
        led.set_budget(load(sets[key], led).dataset_id, 1.0, DELTA)
    go = _FORK.Event()
    kids = [_start(_race, str(path), str(sets[k]), k, go, 3) for k in ("A", "A+1", "A-1", "half")]
    go.set()
    results = []
    for proc, recv in kids:
        assert recv.poll(120), "a racing process gave no answer"
        status, value = recv.recv()
        proc.join(30)
        assert status == "ok", value
        results += value
    assert results.count("ok") >= 2
    con = sqlite3.connect(path)
    images = [r[0] for r in con.execute("SELECT image_id FROM images")]
    assert images and not any(i.startswith("set:") for i in images)
    for image in images:  # every picture's composed spend stays within its budget
        rids = [r[0] for r in con.execute(
            "SELECT release_id FROM release_images WHERE image_id = ?", (image,))]  # fmt: skip
        plans = [ledger_mod.LedgerStore.plans_of(con, [rid]) for rid in rids]
        spent = composed_spend([p for ps in plans for p in ps], DELTA)
        assert spent.epsilon <= 1.0 * (1 + REL_TOL), (image, len(rids), spent)


def test_the_ledger_file_is_private(tmp_path, monkeypatch):
    import os

    old_mask = os.umask(0o022)  # the usual umask, which made 0644 / 0755 before
    request = monkeypatch  # noqa: F841 - keeps the fixture order of the other tests
    led = Ledger(tmp_path / "fresh" / "ledger.sqlite")
    led.identity_key()
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o700
    assert stat.S_IMODE(led.path.stat().st_mode) == 0o600
    # A ledger written by an older dpagg (0644) is tightened once, with a notice.
    old, _ = _v2_copy(tmp_path)
    old.path.chmod(0o644)
    Ledger(old.path).status("ds-x")
    assert stat.S_IMODE(old.path.stat().st_mode) == 0o600
    os.umask(old_mask)
