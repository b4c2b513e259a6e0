"""Tests of the DP Gaussian mean mechanism (dpagg_core.privacy.mechanism).

Statistical assertions use thresholds of at least 5 standard errors (or p-values / confidence
levels of about 1e-6), so a correct mechanism fails them with probability ~1e-6 per check.
The worst-case-neighbour epsilon audit is in tests/test_audit.py (it reuses
dpagg_core.privacy.audit).
"""

from __future__ import annotations

import itertools
import math
import random
from datetime import datetime, timezone

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

import dpagg_core
from dpagg_core.errors import DpaggError
from dpagg_core.privacy import mechanism
from dpagg_core.privacy.accountant import PrivacyPlan
from dpagg_core.privacy.mechanism import Release, check_inputs, clip_rows, dp_mean, privacy_record

Z5 = 5.0  # standard errors
P_TINY = 1e-6  # p-value threshold (about 5 sigma)


def plan_full(n: int, z: float = 1.0, **kw) -> PrivacyPlan:
    return PrivacyPlan(
        sampling="full", n=n, delta=1e-5, noise_multiplier=z, epsilon=1.0, accountant="test", **kw
    )


def plan_wor(n: int, m: int, z: float = 1.0) -> PrivacyPlan:
    return PrivacyPlan(
        sampling="wor", n=n, m=m, delta=1e-5, noise_multiplier=z, epsilon=1.0, accountant="test"
    )


def plan_poisson(n: int, q: float, z: float = 1.0) -> PrivacyPlan:
    return PrivacyPlan(
        sampling="poisson",
        n=n,
        q=q,
        delta=1e-5,
        noise_multiplier=z,
        epsilon=1.0,
        accountant="test",
    )


def exact_norm(row: np.ndarray) -> float:
    """Independent, correctly rounded-ish, overflow-safe norm (math.hypot)."""
    return math.hypot(*(float(v) for v in row))


def unit(row: np.ndarray) -> np.ndarray:
    """The row's direction, computed after an exact power-of-two rescale into the normal range
    (a subnormal row's own norm has too few significant bits to divide by)."""
    exponent = np.frexp(np.abs(row).max())[1]
    scaled = np.ldexp(row, -int(exponent))
    return scaled / exact_norm(scaled)


@pytest.fixture
def no_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the noise source by zeros so the deterministic part can be checked exactly."""
    monkeypatch.setattr(mechanism, "_gaussian_noise", lambda shape, std: np.zeros(shape))


# ------------------------------------------------------------------------------------------------
# Clipping
# ------------------------------------------------------------------------------------------------

row_arrays = st.tuples(st.integers(1, 6), st.integers(1, 8)).flatmap(
    lambda shape: arrays(
        np.float64, shape, elements=st.floats(-1e6, 1e6, allow_nan=False, width=64)
    )
)


@settings(max_examples=150, deadline=None)
@given(
    rows=row_arrays,
    exponent=st.integers(-150, 150),
    clip_norm=st.floats(1e-3, 1e3),
    mode=st.sampled_from(["clip", "normalize"]),
)
def test_clipped_norms_never_exceed_c(
    rows: np.ndarray, exponent: int, clip_norm: float, mode: str
) -> None:
    rows = rows * 10.0**exponent  # tiny and huge magnitudes (overflow / underflow paths)
    out = clip_rows(rows, clip_norm, mode)
    assert out.shape == rows.shape and out.dtype == np.float64
    for before, after in zip(rows, out, strict=True):
        norm_before, norm_after = exact_norm(before), exact_norm(after)
        assert norm_after <= clip_norm  # exact, no tolerance
        if norm_before == 0.0:
            assert not after.any()  # zero rows stay zero, in both modes
            continue
        # direction is kept: same unit vector (entries far below the norm may underflow to 0)
        assert norm_after > 0
        np.testing.assert_allclose(unit(after), unit(before), rtol=1e-9, atol=1e-12)
        if mode == "normalize" or norm_before > clip_norm:
            assert norm_after == pytest.approx(clip_norm, rel=1e-9)
        elif norm_before < clip_norm * (1 - 1e-9):
            np.testing.assert_array_equal(after, before)  # short rows untouched


def test_clip_rows_does_not_modify_its_input() -> None:
    rows = np.array([[3.0, 4.0], [0.1, 0.0]])
    copy = rows.copy()
    clip_rows(rows, 1.0)
    np.testing.assert_array_equal(rows, copy)


# ------------------------------------------------------------------------------------------------
# The deterministic part of a release: centre, clip, denominator
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["clip", "normalize"])
def test_release_is_centre_plus_mean_of_clipped_items(no_noise: None, mode: str) -> None:
    rng = np.random.default_rng(1)
    n, d, c = 7, 5, 0.8
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 3.0, size=(n, 1))
    center = rng.normal(size=d)
    diff = x - center
    norms = np.linalg.norm(diff, axis=1, keepdims=True)
    factor = np.minimum(1.0, c / norms) if mode == "clip" else c / norms
    expected = center + (diff * factor).sum(axis=0) / n
    rel = dp_mean(
        x, plan=plan_full(n), clip_norm=c, center=center, mode=mode, centre_kind="initializer"
    )
    assert isinstance(rel, Release)
    assert rel.vector.dtype == np.float64 and rel.vector.shape == (d,)
    # Published at float32 precision (docs/privacy.md invariant 6): exact float32 values, within
    # half a float32 ulp (plus float64 summation error) of the float64 mean.
    np.testing.assert_array_equal(rel.vector, rel.vector.astype(np.float32))
    np.testing.assert_allclose(rel.vector, expected, rtol=2.0**-24 * 1.01, atol=1e-12)
    assert rel.record["centre"] == "initializer" and rel.record["clip_mode"] == mode


def test_torch_input_and_item_shape(no_noise: None) -> None:
    # [n, v, dim] float32 torch tensor, as an EmbeddingSet holds; released with shape [v, dim].
    t = torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(4, 2, 3) / 100.0
    rel = dp_mean(t, plan=plan_full(4), clip_norm=10.0)
    assert rel.vector.shape == (2, 3) and rel.vector.dtype == np.float64
    np.testing.assert_allclose(rel.vector, t.double().mean(dim=0).numpy(), rtol=2.0**-24 * 1.01)


def test_inputs_are_never_modified() -> None:
    x_np = np.full((3, 4), 5.0)
    x_t = torch.full((3, 4), 5.0, dtype=torch.float64)
    center = np.ones(4)
    for x in (x_np, x_t):
        dp_mean(x, plan=plan_full(3), clip_norm=1.0, center=center, centre_kind="initializer")
    assert np.all(x_np == 5.0) and bool(torch.all(x_t == 5.0)) and np.all(center == 1.0)


def test_wor_subsample_through_dp_mean(no_noise: None) -> None:
    """One-hot items reveal the (normally secret) subsample when the noise is switched off."""
    n, m, reps = 8, 3, 2000
    plan = plan_wor(n, m)
    counts = np.zeros(n)
    for _ in range(reps):
        v = dp_mean(np.eye(n), plan=plan, clip_norm=1.0).vector * m  # denominator m
        picked = np.isclose(v, 1.0)
        assert picked.sum() == m and np.allclose(v[~picked], 0.0)
        counts += picked
    p = m / n
    se = math.sqrt(reps * p * (1 - p))
    assert np.all(np.abs(counts - reps * p) <= Z5 * se)


def test_poisson_uses_public_denominator(no_noise: None) -> None:
    n, q, reps = 10, 0.3, 2000
    plan = plan_poisson(n, q)
    counts = np.zeros(n)
    sizes = []
    for _ in range(reps):
        v = dp_mean(np.eye(n), plan=plan, clip_norm=1.0).vector * (q * n)  # public q*n
        picked = np.isclose(v, 1.0)
        assert np.allclose(v[~picked], 0.0)
        counts += picked
        sizes.append(picked.sum())
    se = math.sqrt(reps * q * (1 - q))
    assert np.all(np.abs(counts - reps * q) <= Z5 * se)
    assert len(set(sizes)) > 1  # the sample size is random, the denominator is not


# ------------------------------------------------------------------------------------------------
# Subsampling
# ------------------------------------------------------------------------------------------------


def test_wor_subsample_is_exact_size_distinct_and_uniform() -> None:
    n, m, reps = 6, 2, 30000
    plan = plan_wor(n, m)
    subsets = {s: 0 for s in itertools.combinations(range(n), m)}
    for _ in range(reps):
        idx = mechanism._draw_subsample(plan)
        assert idx.size == m and len(set(idx.tolist())) == m
        assert idx.min() >= 0 and idx.max() < n
        subsets[tuple(int(i) for i in idx)] += 1
    observed = np.array(list(subsets.values()))
    # every m-subset equally likely: chi-square goodness of fit
    assert stats.chisquare(observed).pvalue > P_TINY
    # inclusion rate m/n per index (binomial bound)
    inclusion = np.zeros(n)
    for s, k in subsets.items():
        inclusion[list(s)] += k
    p = m / n
    assert np.all(np.abs(inclusion - reps * p) <= Z5 * math.sqrt(reps * p * (1 - p)))


def test_poisson_subsample_rates_and_independence() -> None:
    n, q, reps = 12, 0.25, 20000
    plan = plan_poisson(n, q)
    hits = np.zeros((reps, n), dtype=bool)
    for r in range(reps):
        hits[r, mechanism._draw_subsample(plan)] = True
    rate_se = math.sqrt(reps * q * (1 - q))
    assert np.all(np.abs(hits.sum(axis=0) - reps * q) <= Z5 * rate_se)
    pair = (hits[:, 0] & hits[:, 1]).sum()  # independent inclusion: rate q^2
    assert abs(pair - reps * q * q) <= Z5 * math.sqrt(reps * q * q * (1 - q * q))


def test_full_sampling_uses_every_item() -> None:
    np.testing.assert_array_equal(mechanism._draw_subsample(plan_full(5)), np.arange(5))


# ------------------------------------------------------------------------------------------------
# Noise
# ------------------------------------------------------------------------------------------------


def test_noise_is_gaussian_with_the_planned_std() -> None:
    n, d, c, z = 4, 200_000, 1.0, 1.5
    plan = plan_full(n, z)
    sigma = plan.noise_std(c)
    assert sigma == pytest.approx(z * 2 * c / n)
    noise = dp_mean(np.zeros((n, d)), plan=plan, clip_norm=c).vector  # mean is exactly 0
    # variance: d * s2 / sigma^2 ~ chi-square(d), two-sided interval at 1e-7 each side
    stat = float(np.sum(noise**2)) / sigma**2
    assert stats.chi2.ppf(1e-7, d) <= stat <= stats.chi2.ppf(1 - 1e-7, d)
    assert abs(noise.mean()) <= Z5 * sigma / math.sqrt(d)
    # shape: Kolmogorov-Smirnov against N(0, sigma^2); tails at 3 sigma
    assert stats.kstest(noise / sigma, "norm").pvalue > P_TINY
    p3 = 2 * stats.norm.sf(3.0)
    tail = int(np.sum(np.abs(noise) > 3 * sigma))
    assert abs(tail - d * p3) <= Z5 * math.sqrt(d * p3 * (1 - p3))
    # coordinates independent (lag-1 correlation) and not on a coarse grid: published at float32
    # (2^23 values per octave), 2e5 draws share a value only by birthday collisions (~270 here)
    r = np.corrcoef(noise[:-1], noise[1:])[0, 1]
    assert abs(r) <= Z5 / math.sqrt(d)
    assert np.unique(noise).size >= d - 1000


def test_noise_is_fresh_and_ignores_global_seeds() -> None:
    x = np.zeros((3, 16))
    plan = plan_full(3)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        np_state, py_state, torch_state = np.random.get_state(), random.getstate(), None
        torch_state = torch.get_rng_state().clone()
        outs.append(dp_mean(x, plan=plan, clip_norm=1.0).vector)
        # the mechanism never draws from (or touches) the global generators
        assert np.array_equal(np.random.get_state()[1], np_state[1])
        assert random.getstate() == py_state
        assert torch.equal(torch.get_rng_state(), torch_state)
    assert not np.array_equal(outs[0], outs[1])
    assert np.all(outs[0] != outs[1])  # every coordinate differs


# ------------------------------------------------------------------------------------------------
# Bad input: refused before any randomness is drawn
# ------------------------------------------------------------------------------------------------


def _good() -> dict:
    return dict(vectors=np.ones((4, 3)), plan=plan_full(4), clip_norm=1.0)


def _with(**changes) -> dict:
    kw = _good()
    kw.update(changes)
    return kw


def _nan_at(i: int, j: int) -> np.ndarray:
    x = np.ones((4, 3))
    x[i, j] = np.nan
    return x


BAD_INPUTS = {
    "nan": _with(vectors=_nan_at(2, 1)),
    "inf": _with(vectors=np.full((4, 3), np.inf)),
    "neg_inf_torch": _with(vectors=torch.tensor([[1.0, -math.inf]] * 4)),
    "one_d": _with(vectors=np.ones(4)),
    "wrong_n": _with(vectors=np.ones((5, 3))),
    "no_items": _with(vectors=np.ones((0, 3))),
    "empty_items": _with(vectors=np.ones((4, 0))),
    "strings": _with(vectors=np.array([["a"] * 3] * 4)),
    "complex": _with(vectors=np.ones((4, 3), dtype=complex)),
    "ragged": _with(vectors=[[1.0, 2.0], [1.0]]),
    "clip_zero": _with(clip_norm=0.0),
    "clip_negative": _with(clip_norm=-1.0),
    "clip_nan": _with(clip_norm=math.nan),
    "clip_inf": _with(clip_norm=math.inf),
    "clip_bool": _with(clip_norm=True),
    "clip_str": _with(clip_norm="1"),
    "center_shape": _with(center=np.zeros(4)),
    "center_nan": _with(center=np.array([0.0, np.nan, 0.0])),
    "overflow": _with(vectors=np.full((4, 3), 1e308), center=np.full(3, -1e308)),
    "mode": _with(mode="bogus"),
    "centre_kind_without_center": _with(centre_kind="initializer"),
    "nonzero_center_called_origin": _with(center=np.ones(3)),
    "centre_kind_text": _with(centre_kind="Origin; rm -rf"),
    "base_model_path": _with(base_model_id="/home/alice/models/sd15.safetensors"),
    "base_model_home": _with(base_model_id="~/sd15"),
    "base_model_windows": _with(base_model_id="C:\\models\\sd15.ckpt"),
    "base_model_newline": _with(base_model_id="sd15\nseed=4"),
    "plan_type": _with(plan={"sampling": "full", "n": 4}),
    "plan_zero_noise": _with(
        plan=PrivacyPlan("full", n=4, delta=1e-5, noise_multiplier=0.0, epsilon=1.0, accountant="t")
    ),
    "plan_m_too_big": _with(plan=plan_wor(4, 5)),
    "plan_bad_q": _with(plan=plan_poisson(4, 1.5)),
    "plan_bad_sampling": _with(
        plan=PrivacyPlan("all", n=4, delta=1e-5, noise_multiplier=1.0, epsilon=1.0, accountant="t")
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_before_any_randomness(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def spy(name: str):
        real = getattr(mechanism, name)

        def wrapped(*a, **k):
            calls.append(name)
            return real(*a, **k)

        return wrapped

    for name in ("_gaussian_noise", "_draw_subsample", "_uniform_bits", "_secure_standard_normal"):
        monkeypatch.setattr(mechanism, name, spy(name))
    kw = dict(BAD_INPUTS[case])
    with pytest.raises(DpaggError) as err:
        dp_mean(kw.pop("vectors"), **kw)
    assert calls == [], f"randomness drawn before rejecting {case}: {calls}"
    assert len(str(err.value)) > 20  # a message that says what to fix


@pytest.mark.parametrize("case", ["nan", "inf", "one_d", "wrong_n", "clip_zero", "center_shape"])
def test_check_inputs_rejects_the_same(case: str) -> None:
    kw = dict(BAD_INPUTS[case])
    with pytest.raises(DpaggError):
        check_inputs(kw["vectors"], kw["plan"], kw["clip_norm"], kw.get("center"))


def test_check_inputs_returns_float64_copies() -> None:
    x = np.ones((4, 3), dtype=np.float32)
    arr, cen = check_inputs(x, plan_full(4), 1.0, np.zeros(3, dtype=np.float32))
    assert arr.dtype == np.float64 and cen is not None and cen.dtype == np.float64
    arr[0, 0] = 5.0
    assert x[0, 0] == 1.0


# ------------------------------------------------------------------------------------------------
# Privacy record
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plan,extra",
    [
        (plan_full(4, 2.5), {}),
        (plan_wor(4, 2, 1.25), {"m": "2"}),
        (plan_poisson(4, 0.5, 0.75), {"q": "0.5"}),
    ],
)
def test_privacy_record_is_public_strings_only(plan: PrivacyPlan, extra: dict) -> None:
    secret = np.full((4, 3), 123.456789)  # a distinctive private value
    rel = dp_mean(secret, plan=plan, clip_norm=0.5, base_model_id="0123abcdef456789")
    rec = rel.record
    assert rec == privacy_record(plan, 0.5, base_model_id="0123abcdef456789")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in rec.items())
    expected_keys = {
        "mechanism", "epsilon", "delta", "noise_multiplier", "sigma", "sensitivity", "clip_norm",
        "clip_mode", "n", "sampling", "denominator", "releases", "neighbouring", "accountant",
        "centre", "dpagg_version", "base_model_id", "created",
    } | set(extra)  # fmt: skip
    assert set(rec) == expected_keys
    for k, v in extra.items():
        assert rec[k] == v
    assert rec["mechanism"] == "dpagg-gaussian-mean"
    assert float(rec["epsilon"]) == plan.epsilon and float(rec["delta"]) == plan.delta
    assert float(rec["sigma"]) == plan.noise_std(0.5)
    assert float(rec["noise_multiplier"]) == plan.noise_multiplier
    assert int(rec["n"]) == 4 and rec["sampling"] == plan.sampling
    assert rec["neighbouring"] == "replace_one" and rec["centre"] == "origin"
    assert rec["dpagg_version"] == dpagg_core.__version__
    assert rec["created"] == datetime.now(timezone.utc).date().isoformat()
    # nothing private: no data values, no released values, no seeds
    blob = " ".join(rec.values())
    assert "123.45" not in blob
    assert not any(word in " ".join(rec).lower() for word in ("seed", "path", "file", "index"))
