"""Free post-processing (dpagg_core.aggregate.postprocess): the James-Stein formula, norm rescaling,
that only the release and public values are used, and how it sits after the ledger."""

from __future__ import annotations

import inspect
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dpagg_core.aggregate import postprocess
from dpagg_core.aggregate.basis_builders import basis_from_token_table
from dpagg_core.aggregate.postprocess import (
    WienerPrior,
    apply,
    james_stein,
    js_factor,
    rescale_norms,
    wiener,
)
from dpagg_core.aggregate.release import release_embeddings
from dpagg_core.errors import DpaggError
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.io.images import dataset_id_for
from dpagg_core.io.released_file import read_released
from dpagg_core.privacy.calibration import calibrate
from dpagg_core.privacy.ledger import Ledger
from dpagg_core.privacy.mechanism import Release

KEY = bytes(range(32))
finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=64)


class _Coords:
    """A basis of the first k coordinate axes of R^d (``project``/``lift`` as ``PublicBasis``)."""

    def __init__(self, d: int, k: int) -> None:
        self.u = np.eye(d)[:, :k]

    def project(self, x):
        return np.asarray(x, dtype=np.float64) @ self.u

    def lift(self, y):
        return self.u @ np.asarray(y, dtype=np.float64)


@settings(max_examples=200, deadline=None)
@given(
    r=arrays(np.float64, st.integers(1, 40), elements=finite),
    shift=finite,
    sigma=st.floats(0, 5, allow_nan=False),
    k=st.integers(1, 200),
)
def test_james_stein_is_the_positive_part_formula(r, shift, sigma, k):
    c = np.full_like(r, shift) * np.linspace(-1, 1, r.size)
    out, f = james_stein(r, c, sigma=sigma, k=k)
    d2 = float((r - c) @ (r - c))
    if k <= 2:
        expected = 1.0
    elif d2 == 0:
        expected = 0.0
    else:
        expected = max(0.0, 1.0 - (k - 2) * sigma**2 / d2)
    assert f == pytest.approx(expected, rel=1e-12, abs=1e-15) and 0.0 <= f <= 1.0
    np.testing.assert_allclose(out, c + expected * (r - c), rtol=1e-12, atol=1e-12)
    # shrinks toward the centre along r - c: never longer, never another direction
    assert np.linalg.norm(out - c) <= np.linalg.norm(r - c) * (1 + 1e-12) + 1e-12


@settings(max_examples=100, deadline=None)
@given(
    r=arrays(np.float64, 12, elements=finite),
    sigma=st.floats(1e-3, 5, allow_nan=False),
    noise=st.dictionaries(
        st.sampled_from(["n", "epsilon", "delta", "clip_norm", "dataset", "name"]),
        st.text(max_size=8),
    ),
)
def test_postprocessing_reads_only_the_release_and_public_values(r, sigma, noise):
    """``apply`` is a function of (release, centre, sigma and K from the record, layout, public
    target norms): every other record field, whatever it holds, changes nothing, and the same
    inputs always give the same output (deterministic, no randomness)."""
    layout = [("emb_params", 2, 6)]
    c = np.linspace(-1, 1, 12)
    record = {"sigma": repr(sigma), "basis_dim": "8"}
    norms = {"emb_params": 0.7}
    prior = WienerPrior(basis=_Coords(12, 8), mean=c, variances=np.linspace(0.1, 2.0, 8))
    for method in postprocess.METHODS:
        a, extra_a = apply(r, method=method, record=record, layout=layout, centre=c,
                           target_norms=norms, prior=prior)  # fmt: skip
        b, extra_b = apply(r, method=method, record={**noise, **record}, layout=layout,
                           centre=c, target_norms=norms, prior=prior)  # fmt: skip
        assert np.array_equal(a, b) and extra_a == extra_b
        assert np.array_equal(a, a.astype(np.float32).astype(np.float64))  # published precision
    # the signature admits nothing that could carry the private per-image embeddings
    params = set(inspect.signature(apply).parameters)
    assert params == {"release", "method", "record", "layout", "centre", "target_norms", "prior"}


def test_js_uses_the_noised_dimension_k_and_lowers_the_squared_error():
    rng = np.random.default_rng(0)
    k, sigma, trials = 32, 1.0, 4000
    mu = np.zeros(k)
    mu[0] = 2.0  # ||mu||^2 = 4 << k sigma^2 = 32: shrinkage pays
    raw = mu + sigma * rng.standard_normal((trials, k))
    shrunk = np.stack([james_stein(x, None, sigma=sigma, k=k)[0] for x in raw])
    se_raw = ((raw - mu) ** 2).sum(axis=1)
    se_js = ((shrunk - mu) ** 2).sum(axis=1)
    # E se_raw = k; positive-part JS risk here is ~ ||mu||^2-ish: far below (5 SE margin)
    assert se_raw.mean() == pytest.approx(k, abs=5 * math.sqrt(2 * k / trials))
    assert se_js.mean() < 0.5 * se_raw.mean()
    # K comes from the record: basis_dim for a projected release, else the full D
    assert postprocess.noised_coordinates({"basis_dim": "16"}, 128) == 16
    assert postprocess.noised_coordinates({}, 128) == 128
    assert js_factor(1.0, sigma=1.0, k=2) == 1.0 and js_factor(0.0, sigma=1.0, k=5) == 0.0


def test_rescale_norms_per_vector_per_key():
    layout = [("clip_l", 2, 3), ("clip_g", 2, 4)]
    r = np.arange(1.0, 15.0)
    r[3:6] = 0.0  # a zero vector stays zero
    out = rescale_norms(r, layout=layout, target_norms={"clip_l": 2.0, "clip_g": 0.5})
    l_part, g_part = out[:6].reshape(2, 3), out[6:].reshape(2, 4)
    assert np.linalg.norm(l_part[0]) == pytest.approx(2.0) and not l_part[1].any()
    np.testing.assert_allclose(np.linalg.norm(g_part, axis=1), [0.5, 0.5])
    np.testing.assert_allclose(l_part[0] / np.linalg.norm(l_part[0]), r[:3] / np.linalg.norm(r[:3]))
    with pytest.raises(DpaggError, match="target norm"):
        rescale_norms(r, layout=layout, target_norms={"clip_l": 1.0})


# --------------------------------------------------------------------------------------------
# After the ledger
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def basis():
    from tiny_models import tiny_text_encoder

    return basis_from_token_table(tiny_text_encoder(32, seed=0), 4, vectors=2)


def make_set(model_id: str, seed: int = 0, tag: bytes = b"s") -> EmbeddingSet:
    gen = torch.Generator().manual_seed(seed)
    centre = 0.3 * torch.randn(2, 32, generator=torch.Generator().manual_seed(99))
    return EmbeddingSet(
        vectors={"emb_params": (centre + 0.2 * torch.randn(30, 2, 32, generator=gen)).float()},
        kind="textual_inversion",
        model_family="sd1",
        base_model_id=model_id,
        centre={"emb_params": centre.float()},
        initializer="painting",
        dataset_id=dataset_id_for([tag], key=KEY),
    )


def test_ledger_keeps_the_raw_release_and_a_rerun_gives_the_same_file(tmp_path, basis):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    eset = make_set(basis.base_model_id)
    plan = calibrate(2.0, 1e-5, eset.n, "full")
    out = tmp_path / "embeddings"
    kw = dict(plan=plan, clip_norm=0.5, out_dir=out, ledger=ledger, basis=basis)
    first = release_embeddings(eset, name="pp", postprocess="js+norm", **kw)
    tensors, record = read_released(first.path)
    assert record["postprocess"] == "js+norm" and record["postprocess_js_k"] == "8"
    assert record["postprocess_js_sigma"] == record["sigma"]
    f = float(record["postprocess_js_factor"])
    assert 0.0 <= f <= 1.0
    assert json.loads(record["postprocess_target_norms"]) == dict(basis.typical_norms)
    np.testing.assert_allclose(tensors["emb_params"].norm(dim=1).numpy(), 2 * [
        basis.typical_norms["emb_params"]], rtol=1e-6)  # fmt: skip
    # the ledger holds the RAW release (no postprocess fields); the file is apply() of it
    row = ledger.get_release(first.release_id)
    assert "postprocess" not in row["record"]
    expected, _ = apply(
        row["vector"],
        method="js+norm",
        record=row["record"],
        layout=[("emb_params", 2, 32)],
        centre=eset.flat_centre(),
        target_norms=basis.typical_norms,
    )
    assert np.array_equal(tensors["emb_params"].double().reshape(-1).numpy(), expected)
    assert not np.array_equal(row["vector"].reshape(-1), expected)

    again = release_embeddings(eset, name="pp", postprocess="js+norm", **kw)
    assert again.reused and again.path == first.path
    assert sorted(p.name for p in out.iterdir()) == ["pp.safetensors"]
    # another post-processing of the same recorded release: free, written beside it
    raw = release_embeddings(eset, name="pp", postprocess="none", **kw)
    assert raw.reused and raw.path.name == "pp-2.safetensors"
    assert raw.spent_epsilon == first.spent_epsilon
    assert np.array_equal(raw.vectors["emb_params"].double().reshape(-1), row["vector"].reshape(-1))
    assert len(ledger.list_releases(eset.dataset_id)) == 1


def test_the_file_depends_on_the_private_set_only_through_the_release(tmp_path, basis, monkeypatch):
    """Two different private sets whose (patched) raw releases are equal give identical files."""
    raw = make_set(basis.base_model_id).flat().mean(axis=0)
    from dpagg_core.aggregate import release as release_module

    real_draw = release_module.draw_release

    def fixed_draw(ledger, prepared):
        result = real_draw(ledger, prepared)
        record = dict(result.release.record)
        return type(result)(**{**result.__dict__, "release": Release(raw.copy(), record)})

    monkeypatch.setattr(release_module, "draw_release", fixed_draw)
    files = []
    for seed, tag in ((1, b"a"), (2, b"b")):
        eset = make_set(basis.base_model_id, seed=seed, tag=tag)
        plan = calibrate(2.0, 1e-5, eset.n, "full")
        res = release_embeddings(
            eset,
            plan=plan,
            clip_norm=0.5,
            name=f"s{seed}",
            out_dir=tmp_path / "emb",
            ledger=Ledger(tmp_path / f"l{seed}.sqlite"),
            basis=basis,
            postprocess="js",
        )
        files.append(read_released(res.path)[0]["emb_params"])
    assert torch.equal(files[0], files[1])


def test_norm_without_a_public_target_is_refused_before_spending(tmp_path, basis):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    eset = make_set(basis.base_model_id)
    plan = calibrate(2.0, 1e-5, eset.n, "full")
    kw = dict(plan=plan, clip_norm=0.5, out_dir=tmp_path / "e", ledger=ledger, name="x")
    with pytest.raises(DpaggError, match="typical norm"):
        release_embeddings(eset, postprocess="js+norm", **kw)
    with pytest.raises(DpaggError, match="postprocess"):
        release_embeddings(eset, postprocess="shrink", **kw)
    assert ledger.list_releases() == []
    # full space with JS: K is the full D
    res = release_embeddings(eset, postprocess="js", **kw)
    assert res.record["postprocess_js_k"] == str(eset.flat_dim)


# --------------------------------------------------------------------------------------------
# Wiener filter (posterior mean under a Gaussian prior fitted to public style means)
# --------------------------------------------------------------------------------------------


def test_wiener_is_the_per_coordinate_formula():
    basis = _Coords(5, 3)
    m = np.array([1.0, -1.0, 0.5, 7.0, 7.0])  # the prior mean (its last two values are ignored)
    lam = np.array([4.0, 1.0, 0.0])
    r = np.array([3.0, 1.0, 2.0, 9.0, -2.0])
    out, f = wiener(r, WienerPrior(basis=basis, mean=m, variances=lam), sigma=2.0)
    np.testing.assert_allclose(f, [4 / 8, 1 / 5, 0.0])
    # in the basis: m + f (r - m); outside it (coordinates 4, 5) the release is kept
    np.testing.assert_allclose(out, [1 + 0.5 * 2, -1 + 0.2 * 2, 0.5, 9.0, -2.0])
    # noise std 0: nothing to filter; an isotropic prior is James-Stein-like (one factor)
    np.testing.assert_allclose(wiener(r, WienerPrior(basis=basis, mean=m, variances=lam),
                                      sigma=0.0)[0], r)  # fmt: skip
    iso, f_iso = wiener(r, WienerPrior(basis=basis, mean=m, variances=np.ones(3)), sigma=1.0)
    np.testing.assert_allclose(f_iso, 0.5)
    np.testing.assert_allclose(iso[:3], m[:3] + 0.5 * (r[:3] - m[:3]))


@settings(max_examples=100, deadline=None)
@given(
    r=arrays(np.float64, 6, elements=finite),
    m=arrays(np.float64, 6, elements=finite),
    lam=arrays(np.float64, 4, elements=st.floats(0, 10, allow_nan=False)),
    sigma=st.floats(0, 5, allow_nan=False),
)
def test_wiener_shrinks_toward_the_prior_mean(r, m, lam, sigma):
    prior = WienerPrior(basis=_Coords(6, 4), mean=m, variances=lam)
    out, f = wiener(r, prior, sigma=sigma)
    assert np.all((0 <= f) & (f <= 1))
    # each basis coordinate moves toward the prior mean's, never past it
    d_in, d_out = (r - m)[:4], (out - m)[:4]
    assert np.all(np.abs(d_out) <= np.abs(d_in) + 1e-9)
    assert np.all(d_out * d_in >= -1e-12)
    np.testing.assert_allclose(out[4:], r[4:])


def test_wiener_prior_from_public_style_means_and_it_lowers_the_error():
    rng = np.random.default_rng(1)
    d, k, n_styles, per = 8, 4, 400, 6
    basis = _Coords(d, k)
    centre = np.zeros(d)
    lam = np.array([4.0, 1.0, 0.25, 0.0])  # the spread of the true style means per direction
    mus = np.zeros((n_styles, d))
    mus[:, :k] = 2.0 + rng.standard_normal((n_styles, k)) * np.sqrt(lam)
    styles = [mu + 0.5 * rng.standard_normal((per, d)) for mu in mus]
    prior = WienerPrior.from_style_means(styles, basis=basis, centre=centre)
    np.testing.assert_allclose(prior.mean[:k], 2.0, atol=0.15)
    assert not prior.mean[k:].any()
    # debiased: the within-style part (0.25 / 6 per direction) is taken out
    np.testing.assert_allclose(prior.variances, lam, atol=0.12 * lam.max())
    raw_var = WienerPrior.from_style_means(styles, basis=basis, centre=centre, debias=False)
    assert np.all(raw_var.variances >= prior.variances)
    # clipping at C shortens the per-image coordinates before averaging
    clipped = WienerPrior.from_style_means(styles, basis=basis, centre=centre, clip_norm=1.0)
    assert np.linalg.norm(clipped.mean[:k]) <= 1.0 + 1e-9
    # on releases mu + N(0, sigma^2) in the basis, the posterior mean beats the raw release
    sigma = 1.0
    truth = mus[:, :k]
    noisy = truth + sigma * rng.standard_normal(truth.shape)
    post = np.stack([wiener(np.r_[x, np.zeros(d - k)], prior, sigma=sigma)[0][:k] for x in noisy])
    assert ((post - truth) ** 2).sum(1).mean() < 0.6 * ((noisy - truth) ** 2).sum(1).mean()
    with pytest.raises(DpaggError, match="two public styles"):
        WienerPrior.from_style_means(styles[:1], basis=basis, centre=centre)


def test_wiener_reads_only_the_release_and_the_public_prior():
    """The factor depends on the record's sigma only; the prior is built from public arrays; a
    missing prior is refused; the record names the prior by its digest."""
    basis = _Coords(6, 4)
    prior = WienerPrior(basis=basis, mean=np.ones(6), variances=np.array([1.0, 2.0, 3.0, 0.0]))
    r = np.arange(6.0)
    layout = [("emb_params", 1, 6)]
    out, extra = apply(r, method="wiener", record={"sigma": "1.0", "n": "50", "epsilon": "2"},
                       layout=layout, prior=prior)  # fmt: skip
    expected, f = wiener(r, prior, sigma=1.0)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert extra["postprocess"] == "wiener"
    assert extra["postprocess_wiener_prior_sha256"] == prior.digest()
    assert float(extra["postprocess_wiener_mean_factor"]) == pytest.approx(float(np.mean(f)))
    with pytest.raises(DpaggError, match="public prior"):
        apply(r, method="wiener", record={"sigma": "1.0"}, layout=layout)
    both, _ = apply(r, method="wiener+norm", record={"sigma": "1.0"}, layout=layout,
                    prior=prior, target_norms={"emb_params": 3.0})  # fmt: skip
    assert np.linalg.norm(both) == pytest.approx(3.0)
    params = set(inspect.signature(WienerPrior.from_style_means).parameters)
    assert params == {"styles", "basis", "centre", "clip_norm", "debias"}


def test_release_with_wiener_needs_a_prior_before_spending(tmp_path, basis):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    eset = make_set(basis.base_model_id)
    plan = calibrate(2.0, 1e-5, eset.n, "full")
    kw = dict(plan=plan, clip_norm=0.5, out_dir=tmp_path / "e", ledger=ledger, basis=basis)
    with pytest.raises(DpaggError, match="public prior"):
        release_embeddings(eset, name="w", postprocess="wiener", **kw)
    assert ledger.list_releases() == []
    # a prior from other (public) sets, grouped by style
    public = [make_set(basis.base_model_id, seed=s, tag=bytes([s])).flat() for s in (5, 6, 7)]
    prior = WienerPrior.from_style_means(public, basis=basis, centre=eset.flat_centre())
    res = release_embeddings(eset, name="w", postprocess="wiener", prior=prior, **kw)
    tensors, record = read_released(res.path)
    assert record["postprocess"] == "wiener"
    row = ledger.get_release(res.release_id)
    expected, _ = wiener(row["vector"], prior, sigma=float(row["record"]["sigma"]))
    np.testing.assert_allclose(tensors["emb_params"].double().reshape(-1).numpy(), expected,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
