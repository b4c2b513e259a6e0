"""The paper-comparison benchmark in CI size, on the committed mini model (bench/minimodel).

Runs ``bench/reproduce_paper.py --smoke`` (1 held-out style, n = 10, epsilon in {1, 8}, short
training; ~40 s CPU) and checks what it produced: every method evaluated, metrics in range, the
recorded noise equal to the accountant's for the recorded clip norm, the table and the plot
readable, and a rerun resuming from the log instead of recomputing. Also: the procedural dataset
is deterministic with disjoint index ranges, the mini-model single file round-trips, and the KID
estimator equals a brute-force evaluation of the unbiased MMD^2 formula.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import reproduce_paper  # noqa: E402
from bench.minimodel import artifact, data, judge  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_dataset_is_deterministic_and_ranges_are_disjoint():
    a = data.style_examples("candy striped", 6, offset=data.PRIVATE_OFFSET)
    b = data.style_examples("candy striped", 6, offset=data.PRIVATE_OFFSET)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    ref = data.style_examples("candy striped", 6, offset=data.REFERENCE_OFFSET)
    assert not any(np.array_equal(x.image, y.image) for x, y in zip(a, ref, strict=True))
    assert a[0].image.shape == (32, 32, 3) and a[0].image.dtype == np.uint8
    assert set(data.HELD_OUT).isdisjoint(data.TRAIN_STYLES)
    assert len(data.STYLES) == len(data.TRAIN_STYLES) + len(data.HELD_OUT)
    # every palette and texture of a held-out style is seen in training with other partners
    for style in data.HELD_OUT:
        p, t = style.split(" ")
        assert sum(s.startswith(p + " ") for s in data.TRAIN_STYLES) >= 4
        assert sum(s.endswith(" " + t) for s in data.TRAIN_STYLES) >= 4


def test_kid_is_the_unbiased_mmd_estimator():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 5)), rng.normal(1.0, 1.0, size=(9, 5))

    def k(a, b):
        return (a @ b / 5 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(9)) / (7 * 9)
    assert judge.kid(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    # Unbiased: for two samples of one distribution the estimate averages to ~0 (5 SE bound).
    vals = [judge.kid(rng.normal(size=(40, 4)), rng.normal(size=(40, 4))) for _ in range(200)]
    assert abs(np.mean(vals)) < 5 * np.std(vals) / math.sqrt(len(vals))
    with pytest.raises(ValueError, match="two samples"):
        judge.kid(x[:1], y)


def test_committed_single_file_loads_as_a_diffusers_folder(tmp_path):
    from dpagg_core.training.models import load_pipeline

    folder = artifact.load_minimodel(tmp_path)
    loaded = load_pipeline(folder, family="sd1")
    direct = artifact.load_pipeline()
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(loaded.pipe, name).state_dict(), getattr(direct, name).state_dict()
        assert set(a) <= set(b)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert artifact.load_minimodel(tmp_path) == folder  # cached, not rebuilt
    assert artifact.model_file().stat().st_size <= 25e6


@pytest.mark.slow
def test_smoke_benchmark(tmp_path):
    from dpagg_core.privacy import calibration

    out = tmp_path / "results"
    assert reproduce_paper.main(["--smoke", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    methods = {(r["method"], r["epsilon"]) for r in rows}
    for m in ("ti_shared", "mean", "prompt_words", "no_style"):
        assert (m, None) in methods
    for m in reproduce_paper.DP_METHODS:
        assert {(m, 1.0), (m, 8.0)} <= methods
    assert len(rows) == 4 + len(reproduce_paper.DP_METHODS) * 2
    g = len(reproduce_paper.sample.EVAL_TEMPLATES) * 2  # --smoke: 2 images per template
    for r in rows:
        assert 0.0 <= r["acc"] <= 1.0 and math.isfinite(r["kid"])
        assert r["n_images"] == g and (r["acc"] * g) == pytest.approx(round(r["acc"] * g))
        if r["method"] in reproduce_paper.DPAGG_METHODS and r["method"] != "dpagg_wor":
            assert r["delta"] == 1e-5  # the library default, for every n
            plan = calibration.calibrate(r["epsilon"], 1e-5, 10, "full")
            assert r["sigma"] == pytest.approx(plan.noise_std(r["clip_norm"]), rel=1e-12)
            assert -1.0 <= r["cos"] <= 1.0
        if r["method"] in ("dpsgd", "dpsgd_sub"):
            # z C_g / (qN) with q N = 0.25 * 10
            assert r["sigma"] == pytest.approx(r["z"] * r["clip_norm"] / 2.5, rel=1e-9)
    sig = {(r["method"], r["epsilon"]): r["sigma"] for r in rows if "sigma" in r}
    for m in reproduce_paper.DP_METHODS:
        assert sig[(m, 1.0)] > sig[(m, 8.0)]  # more privacy, more noise
    table = (out / "table.md").read_text()
    assert "| dpsgd |" in table and "| dpagg_wor |" in table and "ε=8" in table
    assert "| dpagg_sub |" in table and "| dpagg_sub_js |" in table and "| dpsgd_sub |" in table
    assert "sampling error of the style-accuracy mean" in table
    assert "Largest binomial sampling error" in table
    # The subspace's C is computed in the subspace: on the same public embeddings around the same
    # centre it is below the full-space C (projection shrinks every row's norm).
    c_sub = {r["clip_norm"] for r in rows if r["method"] == "dpagg_sub_pm"}
    c_full = {r["clip_norm"] for r in rows if r["method"] == "dpagg_pm"}
    assert len(c_sub) == len(c_full) == 1 and c_sub.pop() < c_full.pop()
    # dpagg_pm clips around the public mean, with its own C (dpagg_full: the initializer).
    assert {r["clip_norm"] for r in rows if r["method"] == "dpagg_pm"} != {
        r["clip_norm"] for r in rows if r["method"] == "dpagg_full"
    }
    # Likewise subspace DP-SGD's C_g (public median of ||U^T g||) is below the full-space C_g.
    cg_sub = {r["clip_norm"] for r in rows if r["method"] == "dpsgd_sub"}
    cg_full = {r["clip_norm"] for r in rows if r["method"] == "dpsgd"}
    assert len(cg_sub) == len(cg_full) == 1 and cg_sub.pop() < cg_full.pop()
    from PIL import Image

    with Image.open(out / "utility_vs_epsilon.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200
    # A rerun finds every evaluation in the log and recomputes nothing.
    before = (out / "results.jsonl").read_text()
    assert reproduce_paper.main(["--smoke", "--out", str(out)]) == 0
    assert (out / "results.jsonl").read_text() == before
