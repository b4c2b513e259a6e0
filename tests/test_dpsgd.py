"""DP-SGD textual inversion (dpagg_core.training.dpsgd): per-example gradients, accounting, noise
scale.

* Per-example gradients from the batched "row copy" trick equal one-at-a-time gradients (float64,
  tiny random SD1 model) — and equal the gradient of a single shared parameter.
* The plan's epsilon for T Poisson steps equals dp-accounting's PLD computed directly with
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` composed T times, under both relations.
* The noise on the update has std z C_g / (qN): statistical tests with >= 5 standard errors.
* With noise switched off and q = 1, one SGD step moves the embedding by exactly minus the mean of
  the clipped per-example gradients (the loop does what the docstring says).
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.privacy_accountant import NeighboringRelation
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_pipeline

from dpagg_core.errors import DpaggError
from dpagg_core.privacy import accountant, mechanism
from dpagg_core.training import dpsgd
from dpagg_core.training.diffusers_backend import DiffusersBackend
from dpagg_core.training.ti import LatentDist, resolve_templates

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the non-private reference is bench code, not the package's
    sys.path.insert(0, str(ROOT))

from bench.dpsgd_reference import train_shared_nonprivate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def f64_backend():
    pipe = copy.deepcopy(tiny_pipeline())
    pipe.to(torch.float64)
    return DiffusersBackend.from_pipeline(pipe, base_model_id="tiny-sd1")


def _images(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g, dtype=dtype) * 2 - 1


def _dists(backend, imgs):
    backend.prepare(gradient_checkpointing=False)
    with torch.no_grad():
        return backend.encode_images(imgs), backend.encode_images(imgs.flip(-1))


def _pick(d: LatentDist, idx) -> LatentDist:
    return LatentDist(d.mean[idx], None if d.std is None else d.std[idx])


# --------------------------------------------------------------------------------------------
# Per-example gradients
# --------------------------------------------------------------------------------------------


def test_per_example_gradients_equal_one_at_a_time(f64_backend):
    b = f64_backend
    imgs = _images(5, seed=1)
    dist, dist_flip = _dists(b, imgs)
    g = torch.Generator().manual_seed(3)
    shared = {"emb_params": torch.randn(2, 32, generator=g, dtype=torch.float64) * 0.1}
    temps = resolve_templates("style")
    indices = [10, 11, 12, 13, 14]  # global indices key the per-example randomness
    kw = dict(step=4, seed=9, flip=True, sample_latents=True, image_size=32)
    batched = dpsgd.per_example_gradients(b, dist, dist_flip, indices, shared, temps, **kw)
    assert batched["emb_params"].shape == (5, 2, 32)
    for j, i in enumerate(indices):
        one = dpsgd.per_example_gradients(
            b, _pick(dist, [j]), _pick(dist_flip, [j]), [i], shared, temps, **kw
        )
        torch.testing.assert_close(
            batched["emb_params"][j], one["emb_params"][0], rtol=1e-9, atol=1e-14
        )
        assert one["emb_params"].abs().max() > 1e-8  # a real, non-zero gradient
    # Rows differ (different images and randomness), so the comparison above is not vacuous.
    assert (batched["emb_params"][0] - batched["emb_params"][1]).abs().max() > 1e-8


def test_row_copy_gradient_is_the_shared_parameter_gradient(f64_backend):
    """Single example: d loss / d (its copy) == d loss / d shared, computed without the trick."""
    from dpagg_core.training.ti import _draw, ti_loss_per_image

    b = f64_backend
    imgs = _images(1, seed=2)
    dist, dist_flip = _dists(b, imgs)
    shared = torch.full((1, 32), 0.05, dtype=torch.float64)
    temps = ("a painting in the style of {}",)
    got = dpsgd.per_example_gradients(
        b, dist, dist_flip, [0], {"emb_params": shared}, temps,
        step=0, seed=0, flip=False, sample_latents=False, image_size=32,
    )["emb_params"][0]  # fmt: skip
    theta = shared.clone().requires_grad_(True)
    d = _draw(
        dpsgd.example_generator(0, 0, 0), 1, b.num_train_timesteps, (4, 16, 16), dist.mean.dtype
    )
    t = torch.tensor([d.timestep])
    noisy = b.add_noise(dist.mean, d.noise[None], t)
    cond = b.encode_prompts(list(temps), {"emb_params": theta[None]}, image_size=32)
    loss = ti_loss_per_image(b.predict(noisy, t, cond), d.noise[None]).sum()
    (want,) = torch.autograd.grad(loss, [theta])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 40),
    st.floats(1e-3, 10.0),
    st.integers(0, 2**31 - 1),
)
def test_clipping_bounds_joint_norm(b, dim, clip, seed):
    rng = np.random.default_rng(seed)
    grads = {
        "clip_l": torch.from_numpy(rng.normal(size=(b, 2, dim)) * rng.uniform(0, 20)),
        "clip_g": torch.from_numpy(rng.normal(size=(b, 2, dim + 3))),
    }
    out = dpsgd.clip_per_example(grads, clip)
    flat_in = np.concatenate([grads[k].numpy().reshape(b, -1) for k in grads], 1)
    flat = np.concatenate([out[k].reshape(b, -1) for k in grads], 1)
    norms = np.linalg.norm(flat, axis=1)
    assert np.all(norms <= clip * (1 + 1e-12))
    in_norms = np.linalg.norm(flat_in, axis=1)
    small = in_norms <= clip * (1 - 1e-9)
    np.testing.assert_allclose(flat[small], flat_in[small], rtol=1e-12)  # untouched below C
    # direction is kept (clipping only rescales)
    big = ~small & (in_norms > 0)
    cos = np.sum(flat[big] * flat_in[big], 1) / (norms[big] * in_norms[big])
    np.testing.assert_allclose(cos, 1.0, atol=1e-9)


# --------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------


def _direct_pld(z: float, q: float, steps: int, delta: float, relation, interval: float) -> float:
    acc = pld_privacy_accountant.PLDAccountant(relation, value_discretization_interval=interval)
    event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z))
    acc.compose(dp_event.SelfComposedDpEvent(event, steps))
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize(
    "z,n,expected_batch,steps",
    [(1.2, 100, 10, 50), (0.9, 50, 5, 20), (2.5, 200, 20, 100)],
)
def test_epsilon_equals_direct_dp_accounting(z, n, expected_batch, steps):
    q = expected_batch / n
    delta = 1 / (10 * n)
    relation = NeighboringRelation.REPLACE_ONE  # the only relation dpagg honours
    plan = dpsgd.plan_for_sgd(z, n=n, q=q, steps=steps, delta=delta)
    assert plan.neighbouring == "replace_one"
    assert plan.sampling == "poisson" and plan.releases == steps and plan.q == q
    assert dpsgd.sgd_noise_multiplier(plan) == pytest.approx(z, rel=1e-15)
    # The same computation done by hand with dp-accounting, same discretisation: equal.
    interval = accountant._pld_interval(steps)
    assert plan.epsilon == pytest.approx(
        _direct_pld(z, q, steps, delta, relation, interval), rel=1e-12
    )
    # A finer grid gives a (slightly) smaller, i.e. tighter, epsilon: ours is a valid upper bound.
    fine = _direct_pld(z, q, steps, delta, relation, 1e-4)
    assert fine <= plan.epsilon <= fine * 1.05
    # The update's noise std in the plan's convention is z C_g / (qN).
    assert plan.noise_std(0.7) == pytest.approx(z * 0.7 / (q * n), rel=1e-12)


def test_replace_one_costs_more_than_add_remove_and_add_remove_is_refused():
    """Replace-one (a group of two add/remove changes) costs more than the add/remove epsilon
    dp-accounting gives the same z -- which dpagg no longer offers: q = expected_batch / N and
    the denominator qN come from N, private under add/remove (tests/test_neighbouring.py)."""
    kw = dict(n=100, q=0.1, steps=30, delta=1e-3)
    ro = dpsgd.plan_for_sgd(1.0, **kw).epsilon
    interval = accountant._pld_interval(30)
    ar = _direct_pld(1.0, 0.1, 30, 1e-3, NeighboringRelation.ADD_OR_REMOVE_ONE, interval)
    assert ro > ar
    with pytest.raises(DpaggError, match="neighbouring='add_remove' is not supported"):
        dpsgd.plan_for_sgd(1.0, neighbouring="add_remove", **kw)


def test_calibrate_meets_target():
    plan = dpsgd.calibrate_dpsgd(1.0, 1e-3, n=100, q=0.1, steps=40)
    assert plan.epsilon <= 1.0
    assert plan.epsilon > 0.9  # not grossly over-noised
    z = dpsgd.sgd_noise_multiplier(plan)
    again = dpsgd.plan_for_sgd(z, n=100, q=0.1, steps=40, delta=1e-3)
    assert again.epsilon == pytest.approx(plan.epsilon, rel=1e-9)


# --------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------


def _assert_std(x: np.ndarray, want: float) -> None:
    """Sample std of i.i.d. N(0, want^2) draws within 5 standard errors (SE = want/sqrt(2N))."""
    n = x.size
    se = want / math.sqrt(2 * n)
    assert abs(x.std() - want) < 5 * se, (x.std(), want, se)
    assert abs(x.mean()) < 5 * want / math.sqrt(n)


def test_noisy_mean_gradient_std():
    z, c, denom = 1.7, 0.3, 12.5
    zeros = {"emb_params": np.zeros((8, 12500))}
    out = dpsgd.noisy_mean_gradient(zeros, clip_norm=c, noise_multiplier=z, denominator=denom)
    _assert_std(out["emb_params"].ravel(), z * c / denom)
    # the signal is divided by the same public denominator
    ones = {"emb_params": np.full((2, 3), 5.0)}
    out = dpsgd.noisy_mean_gradient(ones, clip_norm=1e-12, noise_multiplier=1.0, denominator=4)
    np.testing.assert_allclose(out["emb_params"], 1.25, atol=1e-9)


class _ZeroGradBackend:
    """A backend whose loss does not depend on the vectors (gradient exactly 0): the update of an
    SGD step with learning rate 1 is then exactly minus the injected noise / (qN)."""

    model_family = "sd1"
    base_model_id = "zero"
    encoder_keys = ("emb_params",)
    prediction_type = "epsilon"
    num_train_timesteps = 10
    device = torch.device("cpu")
    dtype = torch.float64

    def __init__(self, dim: int) -> None:
        self.embedding_dims = {"emb_params": dim}

    def prepare(self, *, gradient_checkpointing: bool) -> None:
        pass

    def initializer_embedding(self, text: str):
        return {"emb_params": torch.zeros(1, self.embedding_dims["emb_params"])}

    def encode_images(self, images):
        return LatentDist(mean=images[:, :1, :2, :2].clone(), std=None)

    def encode_prompts(self, templates, vectors, *, image_size):
        return vectors["emb_params"]

    def add_noise(self, latents, noise, timesteps):
        return latents + noise

    def training_target(self, latents, noise, timesteps):
        return noise

    def predict(self, noisy, timesteps, cond):
        return noisy + 0.0 * cond.sum()


def test_update_noise_std_end_to_end():
    n, dim, v = 40, 4096, 8
    backend = _ZeroGradBackend(dim)
    cfg = dpsgd.DPSGDConfig(
        steps=1, expected_batch=10, clip_norm=0.5, learning_rate=1.0, optimizer="sgd",
        vectors=v, initializer="x", templates=("{}",), flip=False,
    )  # fmt: skip
    plan = dpsgd.plan_for_sgd(3.0, n=n, q=0.25, steps=1, delta=1e-3)
    calls = []
    res = dpsgd.train_dpsgd(backend, _images(n, 0), cfg, plan=plan, before_noise=calls.append)
    assert calls == [plan]
    update = res.vectors["emb_params"].double().numpy()  # theta_0 = 0
    want = 3.0 * 0.5 / (0.25 * n)  # z C_g / (qN)
    _assert_std(update.ravel(), want)
    assert res.record["sigma"] == repr(plan.noise_std(0.5))
    assert float(res.record["sigma"]) == pytest.approx(want, rel=1e-12)
    assert res.record["mechanism"] == dpsgd.METHOD and res.record["steps"] == "1"


def test_one_step_without_noise_is_minus_mean_clipped_gradient(f64_backend, monkeypatch):
    """q = 1 (every image sampled), noise zeroed: the SGD step is -lr * mean of clipped grads."""
    n = 4
    imgs = _images(n, seed=5)
    cfg = dpsgd.DPSGDConfig(
        steps=1, expected_batch=n, clip_norm=1e-4, learning_rate=10.0, optimizer="sgd",
        vectors=2, seed=3, chunk_size=3,
    )  # fmt: skip
    monkeypatch.setattr(mechanism, "_gaussian_noise", lambda shape, std: np.zeros(shape))
    plan = dpsgd.plan_for_sgd(1.0, n=n, q=1.0, steps=1, delta=1e-3)
    res = dpsgd.train_dpsgd(f64_backend, imgs, cfg, plan=plan)
    dist, dist_flip = _dists(f64_backend, imgs)
    init = res.centre["emb_params"].double()
    grads = dpsgd.per_example_gradients(
        f64_backend, dist, dist_flip, list(range(n)), {"emb_params": init},
        resolve_templates("style"), step=0, seed=3, image_size=32,
    )  # fmt: skip
    norms = grads["emb_params"].flatten(1).norm(dim=1)
    assert torch.all(norms > 1e-4)  # so clipping is active and tested
    clipped = dpsgd.clip_per_example(grads, 1e-4)["emb_params"]
    want = init.numpy() - 10.0 * clipped.sum(0) / n
    np.testing.assert_allclose(res.vectors["emb_params"].double().numpy(), want, rtol=1e-5)


def test_sampling_and_noise_come_from_the_mechanism(f64_backend, monkeypatch):
    """The Poisson draw uses the mechanism's CSPRNG sampler once per step, noise once per step,
    even when the batch is empty."""
    draws, noises = [], []
    real_draw = mechanism._draw_subsample

    def spy_draw(plan):
        draws.append(plan)
        return real_draw(plan)[:0]  # force empty batches

    def spy_noise(shape, std):
        noises.append(std)
        return np.zeros(shape)

    monkeypatch.setattr(mechanism, "_draw_subsample", spy_draw)
    monkeypatch.setattr(mechanism, "_gaussian_noise", spy_noise)
    cfg = dpsgd.DPSGDConfig(steps=3, expected_batch=1, clip_norm=0.2)
    res = dpsgd.train_dpsgd(f64_backend, _images(5, 1), cfg, target_epsilon=4.0, delta=1e-3)
    assert len(draws) == 3 and all(p.q == pytest.approx(0.2) for p in draws)
    assert noises == [pytest.approx(res.noise_multiplier * 0.2)] * 3
    assert res.plan.epsilon <= 4.0


@pytest.mark.parametrize(
    "change,param",
    [
        (dict(steps=0), "steps"),
        (dict(expected_batch=0), "expected_batch"),
        (dict(clip_norm=-1.0), "clip_norm"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(optimizer="rmsprop"), "optimizer"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_config_names_parameter(change, param, f64_backend):
    cfg = dpsgd.DPSGDConfig(**change)
    with pytest.raises(DpaggError, match=param):
        dpsgd.train_dpsgd(f64_backend, _images(4, 0), cfg, target_epsilon=1.0, delta=1e-3)


def test_plan_mismatch_and_missing_budget(f64_backend):
    cfg = dpsgd.DPSGDConfig(steps=2, expected_batch=2)
    wrong = dpsgd.plan_for_sgd(1.0, n=4, q=0.5, steps=3, delta=1e-3)
    called = []
    with pytest.raises(DpaggError, match="does not match"):
        dpsgd.train_dpsgd(f64_backend, _images(4, 0), cfg, plan=wrong, before_noise=called.append)
    with pytest.raises(DpaggError, match="target_epsilon"):
        dpsgd.train_dpsgd(f64_backend, _images(4, 0), cfg)
    assert called == []  # nothing spent on bad input


def test_nonprivate_reference_is_plain_mean_gradient_step(f64_backend):
    """The epsilon = infinity reference: q = 1, SGD: one step is -lr * mean of unclipped grads."""
    n = 3
    imgs = _images(n, seed=8)
    cfg = dpsgd.DPSGDConfig(
        steps=1, expected_batch=n, learning_rate=3.0, optimizer="sgd", vectors=1, seed=2,
    )  # fmt: skip
    got = train_shared_nonprivate(f64_backend, imgs, cfg)["emb_params"].double()
    dist, dist_flip = _dists(f64_backend, imgs)
    init = f64_backend.initializer_embedding("painting")["emb_params"].double()
    grads = dpsgd.per_example_gradients(
        f64_backend, dist, dist_flip, list(range(n)), {"emb_params": init},
        resolve_templates("style"), step=0, seed=2, image_size=32,
    )["emb_params"]  # fmt: skip
    want = init - 3.0 * grads.mean(0)
    torch.testing.assert_close(got, want.float().double(), rtol=1e-5, atol=1e-7)
    assert (got - init).abs().max() > 1e-6


# --------------------------------------------------------------------------------------------
# DP-SGD in a public subspace (issue 10, part 4)
# --------------------------------------------------------------------------------------------


def _fixed_randomness(monkeypatch, n: int):
    """Deterministic stand-ins for the secret subsample and noise (tests only), with a spy."""
    rng = np.random.default_rng(11)
    batches = [np.array([0, 2, 3]), np.array([1]), np.array([0, 1, 2, 3])]
    calls: list[tuple[tuple[int, ...], float]] = []
    state = {"step": 0}

    def draw(plan):
        b = batches[state["step"] % len(batches)]
        state["step"] += 1
        return b[b < n]

    def noise(shape, std):
        calls.append((tuple(shape), float(std)))
        return rng.standard_normal(shape) * std

    monkeypatch.setattr(mechanism, "_draw_subsample", draw)
    monkeypatch.setattr(mechanism, "_gaussian_noise", noise)
    return calls


def _reference_plain_dpsgd(backend, imgs, cfg, plan):
    """Plain DP-SGD written out from the module's building blocks (the loop before the subspace
    option existed): per-example gradients, joint clipping, noisy mean, Adam/SGD step."""
    batches = [np.array([0, 2, 3]), np.array([1]), np.array([0, 1, 2, 3])]
    n = imgs.shape[0]
    z = dpsgd.sgd_noise_multiplier(plan)
    dist, dist_flip = _dists(backend, imgs)
    init = backend.initializer_embedding(cfg.initializer)["emb_params"].double()
    theta = torch.nn.Parameter(init.expand(cfg.vectors, -1).clone())
    opt = torch.optim.Adam([theta], lr=cfg.learning_rate)
    rng = np.random.default_rng(11)
    for step in range(cfg.steps):
        batch = [int(i) for i in batches[step % 3] if i < n]
        summed = np.zeros(tuple(theta.shape))
        for s in range(0, len(batch), cfg.chunk_size):
            idx = batch[s : s + cfg.chunk_size]
            grads = dpsgd.per_example_gradients(
                backend, _pick(dist, idx), _pick(dist_flip, idx), idx,
                {"emb_params": theta.detach()}, resolve_templates(cfg.templates),
                step=step, seed=cfg.seed, flip=cfg.flip, sample_latents=cfg.sample_latents,
                image_size=32,
            )  # fmt: skip
            summed += dpsgd.clip_per_example(grads, cfg.clip_norm)["emb_params"].sum(0)
        std = z * cfg.clip_norm
        noisy = (summed + rng.standard_normal(summed.shape) * std) / (plan.q * n)
        theta.grad = torch.from_numpy(noisy)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return theta.detach().float()


def test_plain_dpsgd_is_unchanged_bit_for_bit_given_fixed_randomness(f64_backend, monkeypatch):
    n = 4
    imgs = _images(n, seed=21)
    cfg = dpsgd.DPSGDConfig(steps=3, expected_batch=2, clip_norm=1e-4, vectors=2, chunk_size=2)
    plan = dpsgd.plan_for_sgd(2.0, n=n, q=0.5, steps=3, delta=1e-3)
    calls = _fixed_randomness(monkeypatch, n)
    res = dpsgd.train_dpsgd(f64_backend, imgs, cfg, plan=plan)
    want = _reference_plain_dpsgd(f64_backend, imgs, cfg, plan)
    assert torch.equal(res.vectors["emb_params"], want)
    assert [shape for shape, _ in calls] == [(2, 32)] * 3  # noise on all D coordinates
    assert res.record["mechanism"] == dpsgd.METHOD and "basis_kind" not in res.record


def _tiny_basis(k: int, *, vectors: int = 2, base_model_id: str = "tiny-sd1", seed: int = 4):
    from dpagg_core.aggregate.subspace import PublicBasis

    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(32, k)))
    return PublicBasis(
        blocks={"emb_params": q}, vectors=vectors, kind="public_embeddings", model_family="sd1",
        base_model_id=base_model_id, centred=True, typical_norms={"emb_params": 1.0}, rows=50,
    )  # fmt: skip


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_subspace_dpsgd_update_lies_in_span_and_noise_is_k_dimensional(
    f64_backend, monkeypatch, optimizer
):
    """With a public basis: theta - centre lies in span(U) after Adam or SGD steps (Adam acts on
    the K coordinates), the noise is drawn once per step on exactly K coordinates with std
    z C_g as planned, and the record names the basis."""
    n, k = 4, 3
    basis = _tiny_basis(k)
    cfg = dpsgd.DPSGDConfig(
        steps=3, expected_batch=2, clip_norm=1e-4, vectors=2, chunk_size=3, optimizer=optimizer,
        learning_rate=1e-2 if optimizer == "adam" else 100.0,
    )  # fmt: skip
    plan = dpsgd.plan_for_sgd(2.0, n=n, q=0.5, steps=3, delta=1e-3)
    calls = _fixed_randomness(monkeypatch, n)
    res = dpsgd.train_dpsgd(f64_backend, _images(n, 21), cfg, plan=plan, basis=basis)
    z = dpsgd.sgd_noise_multiplier(plan)
    assert calls == [((basis.dim,), pytest.approx(z * 1e-4, rel=1e-12))] * 3
    assert basis.dim == 2 * k
    d = (res.vectors["emb_params"].double() - res.centre["emb_params"].double()).reshape(-1)
    d = d.numpy()
    outside = d - basis.U @ (basis.U.T @ d)
    assert np.linalg.norm(d) > 1e-3  # it moved
    theta_norm = np.linalg.norm(res.vectors["emb_params"].double().numpy())
    assert np.linalg.norm(outside) < 1e-6 * theta_norm  # float32 rounding of theta only
    assert res.record["mechanism"] == dpsgd.METHOD_SUBSPACE
    assert res.record["basis_sha256"] == basis.sha256 and res.record["basis_dim"] == "6"
    assert res.record["sigma"] == repr(plan.noise_std(1e-4))  # the same plan as plain DP-SGD


def test_subspace_dpsgd_clips_the_projected_gradient(f64_backend, monkeypatch):
    """q = 1, no noise, SGD: one step moves theta by -lr * U (sum of clip_C(U^T g_i)) / n."""
    n = 3
    basis = _tiny_basis(4, vectors=1)
    imgs = _images(n, seed=5)
    cfg = dpsgd.DPSGDConfig(
        steps=1, expected_batch=n, clip_norm=1e-5, learning_rate=10.0, optimizer="sgd",
        vectors=1, seed=3,
    )  # fmt: skip
    monkeypatch.setattr(mechanism, "_gaussian_noise", lambda shape, std: np.zeros(shape))
    plan = dpsgd.plan_for_sgd(1.0, n=n, q=1.0, steps=1, delta=1e-3)
    res = dpsgd.train_dpsgd(f64_backend, imgs, cfg, plan=plan, basis=basis)
    dist, dist_flip = _dists(f64_backend, imgs)
    init = res.centre["emb_params"].double()
    grads = dpsgd.per_example_gradients(
        f64_backend, dist, dist_flip, list(range(n)), {"emb_params": init},
        resolve_templates("style"), step=0, seed=3, image_size=32,
    )["emb_params"].flatten(1).numpy()  # fmt: skip
    coords = basis.project(grads)
    assert np.all(np.linalg.norm(coords, axis=1) > 1e-5)  # clipping is active
    clipped = mechanism.clip_rows(coords, 1e-5, "clip")
    want = init.numpy().reshape(-1) - 10.0 * basis.lift(clipped.sum(0) / n)
    np.testing.assert_allclose(
        res.vectors["emb_params"].double().numpy().reshape(-1), want, rtol=1e-5
    )


def test_subspace_dpsgd_refuses_a_basis_for_another_model_before_anything(f64_backend):
    cfg = dpsgd.DPSGDConfig(steps=2, expected_batch=2, vectors=2)
    called = []
    for bad, match in (
        (_tiny_basis(3, base_model_id="other-model"), "base model"),
        (_tiny_basis(3, vectors=1), "vectors"),
    ):
        with pytest.raises(DpaggError, match=match):
            dpsgd.train_dpsgd(
                f64_backend, _images(4, 0), cfg, target_epsilon=2.0, delta=1e-3,
                before_noise=called.append, basis=bad,
            )  # fmt: skip
    assert called == []
