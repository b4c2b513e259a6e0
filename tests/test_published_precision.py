"""A release carries nothing beyond its published (float32) value (docs/privacy.md, item 5).

The float64 noisy mean's low-order bits depend on the true mean (the noise's float64 lattice
shows through; measured p < 1e-300 below at 10^6 coordinates). The mechanism rounds to float32,
the precision of every released file, so the Python API, the ledger and the file hold one value.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from dpagg_core.aggregate.release import release_embeddings
from dpagg_core.errors import DpaggError
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.io.images import dataset_id_for
from dpagg_core.io.released_file import read_released
from dpagg_core.privacy import mechanism
from dpagg_core.privacy.accountant import PrivacyPlan
from dpagg_core.privacy.ledger import Ledger
from dpagg_core.privacy.request_keys import training_request

COORDS = 1_000_000  # low-bit samples per mean: one release of a 10^6-dimensional mean
# False-alarm rate of the "no difference" check: P(p < ALPHA | same distribution) = ALPHA.
ALPHA = 1e-4


def _plan(z: float) -> PrivacyPlan:
    return PrivacyPlan(
        sampling="full",
        n=2,
        delta=1e-5,
        noise_multiplier=z,
        epsilon=100.0,
        accountant="analytic_gaussian",
    )


def _low_bytes(values: np.ndarray, dtype: type) -> np.ndarray:
    bits = values.astype(dtype).view(np.uint32 if dtype is np.float32 else np.uint64)
    return np.bincount((bits & 0xFF).astype(np.int64), minlength=256)


@pytest.mark.parametrize(("z", "offset"), [(0.01, 0.3), (1.0, 1e-3)])
def test_low_bits_do_not_depend_on_the_true_mean(z, offset):
    """Items all at the centre (mean 0) vs all at ``offset``: the two releases' low bytes, at the
    precision they are published (float32) and as the float64 the API returns, have the same
    distribution (chi-square on 256 bins, 10^6 samples each; false alarm ALPHA)."""
    clip = offset * np.sqrt(COORDS) * (1 + 1e-7)
    plan = _plan(z)
    releases = [
        mechanism.dp_mean(np.full((2, COORDS), v), plan=plan, clip_norm=clip).vector
        for v in (0.0, offset)
    ]
    for r in releases:  # what the API returns is exactly what the file stores
        np.testing.assert_array_equal(r, r.astype(np.float32).astype(np.float64))
    f32 = chi2_contingency(np.stack([_low_bytes(r, np.float32) for r in releases])).pvalue
    assert f32 > ALPHA
    f64 = [_low_bytes(r, np.float64) for r in releases]
    # float32-exact values have zero low float64 bits; before rounding, p was < 1e-300 at z=0.01.
    assert f64[0][0] == f64[1][0] == COORDS


def test_api_ledger_and_file_hold_the_same_value(tmp_path):
    gen = torch.Generator().manual_seed(0)
    centre = torch.randn(1, 8, generator=gen)
    eset = EmbeddingSet(
        vectors={"emb_params": centre + 0.1 * torch.randn(10, 1, 8, generator=gen)},
        kind="textual_inversion",
        model_family="sd1",
        base_model_id="m",
        centre={"emb_params": centre},
        initializer="painting",
        dataset_id=dataset_id_for([b"a", b"b"], key=bytes(32)),
    )
    ledger = Ledger(tmp_path / "l.sqlite")
    out = release_embeddings(
        eset,
        plan=PrivacyPlan(**{**_plan(2.0).to_dict(), "n": 10}),
        clip_norm=0.5,
        name="p",
        out_dir=tmp_path / "emb",
        ledger=ledger,
    )
    stored = ledger.list_releases(eset.dataset_id, with_vectors=True)[0]["vector"]
    in_file = read_released(out.path)[0]["emb_params"].double().numpy()
    np.testing.assert_array_equal(np.asarray(stored).reshape(-1), in_file.reshape(-1))


def test_dpsgd_results_are_stored_at_published_precision(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    plan = PrivacyPlan(
        sampling="full",
        n=4,
        delta=1e-5,
        noise_multiplier=5.0,
        epsilon=5.0,
        accountant="analytic_gaussian",
    )
    request = training_request({}, dataset_id="ds-x", plan=plan, name="s", clip_norm=1.0)
    with ledger.reserve(request) as charge:
        done = charge.complete(np.array([0.1, 1 / 3]), {"epsilon": "5"})
    assert done.release.vector.tolist() == [float(np.float32(0.1)), float(np.float32(1 / 3))]
    assert ledger.get_release(charge.release_id)["vector"].tolist() == done.release.vector.tolist()


def test_a_release_beyond_float32_is_refused():
    with pytest.raises(DpaggError, match="float32"):
        mechanism.to_published_precision(np.array([1e39]))
