"""The plan forecast (issue 21 item 2): the SNR of a mean release from public values only."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpagg_core.cli import main
from dpagg_core.errors import DpaggError
from dpagg_core.families import full_space_k
from dpagg_core.privacy.calibration import calibrate
from dpagg_core.privacy.forecast import (
    CLEAR_SNR,
    DEFAULT_K,
    DEFAULT_RHO,
    agreement,
    forecast,
    snr,
    verdict_of,
)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 5000),
    z=st.floats(0.2, 50),
    k=st.integers(1, 4096),
    rho=st.floats(0.01, 1.0),
)
def test_full_sampling_snr_is_the_geometry_formula(n, z, k, rho):
    """SNR = rho n / (2 z sqrt K) for full sampling (sensitivity 2C/n, noise z times it)."""
    from dpagg_core.privacy.bounds import epsilon_for

    plan = epsilon_for(z, 1e-5, n)
    assert snr(plan, k, rho) == pytest.approx(rho * n / (2 * z * math.sqrt(k)), rel=1e-9)


def test_the_benchmark_cells_read_as_bench_snr_geometry_printed():
    """bench/snr_geometry.py's table (rho 0.431, K 32): (50, 2) 0.96, (200, 4) 7.05."""
    assert snr(calibrate(2, 1e-5, 50), 32, 0.431) == pytest.approx(0.96, abs=0.01)
    assert snr(calibrate(4, 1e-5, 200), 32, 0.431) == pytest.approx(7.05, abs=0.02)


def test_verdicts_and_what_would_make_a_clear_style():
    assert [verdict_of(x) for x in (0.5, 1.0, 1.99, 2.0)] == ["noise", "weak", "weak", "clear"]
    plan = calibrate(2, 1e-5, 50)
    f = forecast(plan)
    assert (f.k, f.rho, f.verdict) == (DEFAULT_K, DEFAULT_RHO, "noise")
    # the suggested n (same epsilon) and epsilon (same n) each reach a clear style ...
    assert forecast(calibrate(2, 1e-5, f.needed_n)).snr >= CLEAR_SNR * 0.999
    assert forecast(calibrate(f.needed_epsilon * 1.001, 1e-5, 50)).snr >= CLEAR_SNR
    # ... and are the least that does (one image fewer, 5 % less epsilon: not clear)
    assert forecast(calibrate(2, 1e-5, f.needed_n - 1)).snr < CLEAR_SNR
    assert forecast(calibrate(f.needed_epsilon * 0.95, 1e-5, 50)).snr < CLEAR_SNR
    text = f.text()
    assert "mostly noise" in text and f"about {f.needed_n} images" in text
    clear = forecast(calibrate(4, 1e-5, 200))
    assert clear.verdict == "clear" and clear.needed_n is None and "clear style" in clear.text()


def test_full_space_forecast_is_far_below_the_subspace():
    plan = calibrate(2, 1e-5, 50)
    k = full_space_k("sd1", 2)
    assert k == 1536 and forecast(plan, k).snr == pytest.approx(
        forecast(plan, 32).snr * math.sqrt(32 / 1536)
    )
    with pytest.raises(DpaggError, match="rho"):
        forecast(plan, 32, rho=1.5)


def test_agreement_estimates_rho_without_the_small_sample_bias():
    """Identical deltas of norm 0.5 C: rho = 0.5 exactly. Isotropic deltas with mean 0: the plain
    |mean| of m = 6 unit vectors is about 1/sqrt(6) = 0.41, the unbiased estimate's median over
    200 styles stays below 0.15 (its sd per style is about 0.2; the median of 200 is within
    0.05 of 0 with probability > 0.999)."""
    same = [np.tile([0.3, 0.4, 0.0], (6, 1))]
    assert agreement(same, clip_norm=1.0) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    styles = [rng.normal(size=(6, 16)) for _ in range(200)]
    assert agreement(styles, clip_norm=1.0) < 0.15
    shifted = [rng.normal(size=(6, 16)) * 0.3 + np.eye(16)[0] * 2 for _ in range(200)]
    assert agreement(shifted, clip_norm=1.0) > 0.8  # clipped to unit norm, mostly along e0
    with pytest.raises(DpaggError):
        agreement([np.zeros((1, 4))], clip_norm=1.0)


def test_dpagg_account_shows_the_forecast(capsys):
    assert main(["account", "--epsilon", "2", "--n", "50"]) == 0
    out = capsys.readouterr().out
    # rho n / (2 z sqrt K) = 0.37 * 50 / (2 * 2.00 * sqrt 32) (z = 2.00 at epsilon 2, n 50)
    assert "forecast: signal-to-noise 0.82" in out and "mostly noise" in out
    assert main(["account", "--epsilon", "2", "--n", "50", "--rho", "0.9", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["forecast"]["rho"] == 0.9 and payload["forecast"]["k"] == DEFAULT_K
