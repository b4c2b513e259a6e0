"""DP-SGD textual inversion: the baseline DPAgg-TI is compared against (arXiv 2411.14639, Sec. 5).

One *shared* embedding (``v`` vectors per encoder key) is trained on the whole private set with
DP-SGD (Abadi et al. 2016):

for t = 1..T:
  1. Poisson sampling: every image joins the batch independently with probability ``q``; the
     draw comes from the OS CSPRNG (``dpagg_core.privacy.mechanism``'s sampler) and is never
     returned, logged or stored (docs/privacy.md invariant 3: a known batch voids the
     amplification);
  2. per-example gradients g_i of the TI loss w.r.t. the shared vectors. They come from the
     batched TI backend for free: every example in the chunk gets its *own copy* of the shared
     vectors as its row of an ``[B, v, dim]`` parameter, and the backend treats rows
     independently (``dpagg_core.training.ti`` invariant 1), so row i's gradient is exactly example
     i's gradient (``tests/test_dpsgd.py`` checks this against one-at-a-time gradients);
  3. clipping: g_i <- g_i * min(1, C_g / ||g_i||), the norm taken jointly over all keys/vectors;
  4. noise: G = sum_i g_i + N(0, (z C_g)^2 I), float64, CSPRNG (``mechanism``'s secure sampler),
     drawn even when the batch is empty;
  5. G / (q N): divided by the *expected* batch size, a public constant (never by |batch|);
  6. an optimizer step (Adam or SGD) on the shared vectors: post-processing of G.

Privacy. Replace-one adjacency (the relation DPAgg uses: N public, one image swapped): the
clipped sum moves by up to 2 C_g; dp-accounting's PLD ``REPLACE_ONE`` Gaussian compares N(+s)
with N(-s) for the *per-item* bound s = C_g (outputs 2 C_g apart), so each step is the
Poisson-subsampled Gaussian mechanism with that library's noise multiplier ``z`` and sampling
rate ``q``; T steps compose adaptively. The accountant composes ``PoissonSampledDpEvent(q,
GaussianDpEvent(z))`` T times with PLD (Koskela et al. 2020; Zhu, Dong & Wang 2022).
Add/remove adjacency is refused (``neighbouring='add_remove'`` raises DpaggError): the rate
q = expected_batch / N and the denominator qN are computed from N, which is private under
add/remove, so the noise would change with the data set's size.

In ``dpagg_core.privacy.plan``'s :class:`PrivacyPlan` convention the noise multiplier is std /
sensitivity of the released *mean*: the update G/(qN) has noise std z C_g / (qN) and replace-one
sensitivity 2 C_g / (qN), so ``plan.noise_multiplier = z / 2``, ``plan.noise_std(C_g) == z C_g /
(qN)``, and the plan's PLD event is exactly the DP-SGD event above. :func:`sgd_noise_multiplier`
/ :func:`plan_for_sgd` convert.

Everything that sets the noise (C_g, z, q, T, N) is public (docs/privacy.md invariant 2). The TI
randomness (timesteps, diffusion noise, templates, flips) of example i at step t comes from a
generator keyed by (seed, t, i): public, independent of which examples were sampled.

Public-subspace DP-SGD (``basis=``; issue 10 part 4, the fair baseline for the projected DPAgg
mechanism of ``dpagg_core.privacy.basis``). With a public orthonormal ``U`` (D x K,
:class:`dpagg_core.privacy.basis.PublicBasis`, built from public data only; docs/privacy.md
invariant 8) the shared embedding is parametrised as ``theta = c + U a`` (``c`` the initializer
centre, ``a`` in R^K, starting at 0) and DP-SGD runs on ``a``: per-example gradients w.r.t. ``a``
are ``U^T g_i`` (the chain rule; ``g_i`` the gradient w.r.t. theta, flattened in
``EmbeddingSet.flat`` order), each clipped to C_g in the K coordinates, the noise ``N(0, (z C_g)^2
I_K)`` drawn on the K coordinates, and the optimizer (Adam or SGD) steps ``a``; ``theta`` is mapped
back after each step. So every update lies in span(U) (Adam's per-coordinate scaling acts on ``a``,
not on theta, which would leave the subspace), and the noise has norm about ``z C_g sqrt(K)``
instead of ``z C_g sqrt(D)``. Privacy is unchanged: ``U^T`` maps each example's gradient on its own,
so after clipping one example still moves the sum by at most 2 C_g and the same plan and accountant
apply (the "public-subspace DP-SGD" variant, e.g. Zhou, Wu & Banerjee 2021; Yu et al. 2021). The
record names the basis (kind, k, K, sha256).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from dpagg_core import options
from dpagg_core.errors import DpaggError
from dpagg_core.privacy import calibration, mechanism
from dpagg_core.privacy.basis import check_basis
from dpagg_core.privacy.bounds import epsilon_for
from dpagg_core.privacy.plan import DEFAULT_DELTA, PrivacyPlan, check_neighbouring
from dpagg_core.training.ti import (
    Cancelled,
    LatentDist,
    TIBackend,
    TIConfig,
    _draw,
    check_images,
    initializer_rows,
    keyed_generator,
    param_dtype,
    resize_center_crop,
    resolve_templates,
    step_latents,
    ti_loss,
)

METHOD = "dpsgd-textual-inversion"
METHOD_SUBSPACE = "dpsgd-textual-inversion-subspace"  # with a public basis (module docstring)


@dataclass(frozen=True)
class DPSGDConfig:
    """DP-SGD TI hyper-parameters (all public; none may be derived from the private images).

    ``steps`` T; ``expected_batch`` qN (the sampling rate is ``q = expected_batch / N``, at most
    1); ``clip_norm`` C_g, the per-example gradient bound; ``learning_rate`` and ``optimizer``
    act on the noisy mean gradient (post-processing); ``chunk_size`` bounds memory (examples
    whose per-example gradients are computed together; it never changes the result).
    ``vectors``, ``initializer``, ``templates``, ``resolution``, ``flip``, ``sample_latents`` as in
    :class:`dpagg_core.training.ti.TIConfig`. ``seed`` drives only the TI randomness, never the
    sampling or the noise.
    """

    steps: int = 200
    expected_batch: float = 8.0
    clip_norm: float = 1e-3
    learning_rate: float = 5e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    vectors: int = 1
    initializer: str = "painting"
    multi_token_initializer: Literal["error", "average"] = "error"
    templates: str | tuple[str, ...] = "style"
    resolution: int | None = None
    chunk_size: int = 16
    flip: bool = True
    sample_latents: bool = True
    seed: int = 0

    def sampling_rate(self, n: int) -> float:
        return min(1.0, float(self.expected_batch) / n)


@dataclass
class DPSGDResult:
    """The released shared embedding (``[v, dim]`` per key, float32) and its privacy record."""

    vectors: dict[str, torch.Tensor]
    centre: dict[str, torch.Tensor]
    plan: PrivacyPlan
    noise_multiplier: float  # z: std of the noise on the clipped sum / C_g
    record: dict[str, str]


# --------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------


def sgd_noise_multiplier(plan: PrivacyPlan) -> float:
    """DP-SGD's z (noise std on the clipped sum / C_g) for a ``poisson`` replace-one plan:
    2 x plan z (see module docstring)."""
    if plan.sampling != "poisson":
        raise DpaggError(f"plan.sampling={plan.sampling!r}: DP-SGD plans are 'poisson'")
    check_neighbouring(plan.neighbouring, "plan.neighbouring")
    return plan.noise_multiplier * 2.0


def plan_for_sgd(
    z: float,
    *,
    n: int,
    q: float,
    steps: int,
    delta: float = DEFAULT_DELTA,
    neighbouring: str = "replace_one",
) -> PrivacyPlan:
    """The plan (epsilon at ``delta`` by PLD) of T DP-SGD steps with noise multiplier z.

    ``neighbouring`` must be 'replace_one' (the default); 'add_remove' raises DpaggError."""
    check_neighbouring(neighbouring)
    return epsilon_for(z / 2.0, delta, n, "poisson", q=q, releases=steps)


def calibrate_dpsgd(
    target_epsilon: float,
    delta: float = DEFAULT_DELTA,
    *,
    n: int,
    q: float,
    steps: int,
    neighbouring: str = "replace_one",
) -> PrivacyPlan:
    """The least-noise plan with epsilon <= ``target_epsilon`` for T Poisson steps at rate q.

    ``neighbouring`` must be 'replace_one' (the default); 'add_remove' raises DpaggError."""
    check_neighbouring(neighbouring)
    return calibration.calibrate(target_epsilon, delta, n, "poisson", q=q, releases=steps)


# --------------------------------------------------------------------------------------------
# Per-example gradients, clipping, noise
# --------------------------------------------------------------------------------------------


def example_generator(seed: int, step: int, index: int) -> torch.Generator:
    """TI randomness of example ``index`` at ``step`` (public; independent of the sampling).

    ``ti.image_generator``'s rule with the step in the key: an example is drawn only in the steps
    the secret Poisson sample picks it, so one running stream per image would tie its randomness
    to the secret batches."""
    return keyed_generator("dpagg-dpsgd", int(seed), int(step), int(index))


def per_example_gradients(
    backend: TIBackend,
    dist: LatentDist,
    dist_flip: LatentDist,
    indices: Sequence[int],
    shared: dict[str, torch.Tensor],
    templates: Sequence[str],
    *,
    step: int,
    seed: int,
    flip: bool = True,
    sample_latents: bool = True,
    image_size: int,
) -> dict[str, torch.Tensor]:
    """Gradient of each example's TI loss w.r.t. the shared vectors: ``[B, v, dim]`` per key.

    ``dist``/``dist_flip`` hold the latent posteriors of exactly the B examples ``indices``
    (global indices, which key their randomness). Each example gets its own copy of ``shared``
    as one row of the parameter, so the batched loss sum's gradient row i is example i's
    gradient (the backend processes rows independently)."""
    device = torch.device(backend.device)
    b = len(indices)
    pdtype = param_dtype(backend)
    rows = {
        k: shared[k].to(device, pdtype).unsqueeze(0).expand(b, -1, -1).clone().requires_grad_(True)
        for k in backend.encoder_keys
    }
    shape, ldtype = tuple(dist.mean.shape[1:]), dist.mean.dtype
    n_t = int(backend.num_train_timesteps)
    draws = [
        _draw(example_generator(seed, step, i), len(templates), n_t, shape, ldtype) for i in indices
    ]
    latents = step_latents(
        draws, dist, dist_flip, device=device, flip=flip, sample_latents=sample_latents
    )
    # sum: row i's gradient is loss_i's gradient
    loss = ti_loss(backend, draws, latents, templates, rows, image_size=image_size).sum()
    grads = torch.autograd.grad(loss, [rows[k] for k in backend.encoder_keys])
    return {k: g.detach() for k, g in zip(backend.encoder_keys, grads, strict=True)}


def clip_per_example(grads: dict[str, torch.Tensor], clip_norm: float) -> dict[str, np.ndarray]:
    """Clip every example's gradient (joint L2 norm over all keys) to ``clip_norm``; float64."""
    keys = list(grads)
    flat = np.concatenate(
        [grads[k].detach().to("cpu", torch.float64).flatten(1).numpy() for k in keys], axis=1
    )
    clipped = mechanism.clip_rows(flat, clip_norm, "clip")
    out, start = {}, 0
    for k in keys:
        size = int(np.prod(grads[k].shape[1:]))
        out[k] = clipped[:, start : start + size].reshape(grads[k].shape)
        start += size
    return out


def noisy_mean_gradient(
    clipped_sum: dict[str, np.ndarray],
    *,
    clip_norm: float,
    noise_multiplier: float,
    denominator: float,
) -> dict[str, np.ndarray]:
    """(sum of clipped gradients + N(0, (z C_g)^2 I)) / (qN), float64; CSPRNG noise."""
    std = float(noise_multiplier) * float(clip_norm)
    return {
        k: (np.asarray(s, dtype=np.float64) + mechanism._gaussian_noise(np.shape(s), std))
        / float(denominator)
        for k, s in clipped_sum.items()
    }


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class _State:
    theta: dict[str, torch.nn.Parameter]
    opt: torch.optim.Optimizer
    dist: LatentDist
    dist_flip: LatentDist
    templates: tuple[str, ...]
    size: int
    centre: dict[str, torch.Tensor]
    # Public-subspace DP-SGD: the basis and the K coordinates ``a`` the optimizer steps.
    basis: Any = None
    coords: torch.nn.Parameter | None = None
    keys: tuple[str, ...] = field(default=())

    def result(self) -> dict[str, torch.Tensor]:
        return {k: t.detach().to("cpu", torch.float32).clone() for k, t in self.theta.items()}


def _setup(
    backend: TIBackend, images: torch.Tensor, config: DPSGDConfig, basis: Any = None
) -> _State:
    """Shared vectors at the initializer, the optimizer, and the latents (encoded once). With a
    ``basis`` the optimizer acts on the K coordinates ``a`` (theta = centre + U a)."""
    templates = resolve_templates(config.templates)
    if config.resolution is not None:
        images = resize_center_crop(images, config.resolution)
    if images.shape[-2] % 8 or images.shape[-1] % 8:
        raise DpaggError(
            f"images are {images.shape[-2]}x{images.shape[-1]} px: height and width must be "
            "multiples of 8; set resolution"
        )
    init_cfg = TIConfig(
        initializer=config.initializer,
        multi_token_initializer=config.multi_token_initializer,
        vectors=config.vectors,
    )
    backend.prepare(gradient_checkpointing=False)
    init = initializer_rows(backend, init_cfg)
    v = config.vectors
    centre = {k: init[k].to(torch.float32).expand(v, -1).clone() for k in backend.encoder_keys}
    pdtype = param_dtype(backend)
    theta = {
        k: torch.nn.Parameter(init[k].to(pdtype).expand(v, -1).clone())
        for k in backend.encoder_keys
    }
    params = list(theta.values())
    coords = None
    if basis is not None:
        coords = torch.nn.Parameter(torch.zeros(basis.dim, dtype=torch.float64))
        params = [coords]
    if config.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=config.learning_rate)
    else:
        opt = torch.optim.SGD(params, lr=config.learning_rate)
    device = torch.device(backend.device)
    with torch.no_grad():
        x = images.to(device)
        dist = backend.encode_images(x)
        dist_flip = backend.encode_images(x.flip(-1)) if config.flip else dist
    keys = tuple(basis.keys) if basis is not None else tuple(backend.encoder_keys)
    return _State(
        theta, opt, dist, dist_flip, templates, int(images.shape[-1]), centre, basis, coords, keys
    )


def _clipped_sum(
    backend: TIBackend,
    st: _State,
    config: DPSGDConfig,
    batch: Sequence[int],
    step: int,
    clip_norm: float | None,
) -> dict[str, np.ndarray]:
    """Sum over ``batch`` of per-example gradients, each clipped to ``clip_norm`` (None: no
    clipping), float64 ``[v, dim]`` per key; computed in chunks of ``config.chunk_size``."""
    summed = {k: np.zeros(tuple(st.theta[k].shape), dtype=np.float64) for k in backend.encoder_keys}
    for s in range(0, len(batch), config.chunk_size):
        idx = [int(i) for i in batch[s : s + config.chunk_size]]
        sel = torch.tensor(idx, device=st.dist.mean.device)

        def pick(d: LatentDist, sel: torch.Tensor = sel) -> LatentDist:
            return LatentDist(d.mean[sel], None if d.std is None else d.std[sel])

        grads = per_example_gradients(
            backend,
            pick(st.dist),
            pick(st.dist_flip),
            idx,
            {k: t.detach() for k, t in st.theta.items()},
            st.templates,
            step=step,
            seed=config.seed,
            flip=config.flip,
            sample_latents=config.sample_latents,
            image_size=st.size,
        )
        if st.basis is not None:  # U^T g_i: each example on its own, clipped in K coordinates
            flat = np.concatenate(
                [grads[k].detach().to("cpu", torch.float64).flatten(1).numpy() for k in st.keys],
                axis=1,
            )
            coords = st.basis.project(flat)
            if clip_norm is not None:
                coords = mechanism.clip_rows(coords, clip_norm, "clip")
            summed.setdefault("coords", np.zeros(st.basis.dim))
            summed["coords"] += coords.sum(axis=0)
            continue
        if clip_norm is None:
            rows = {k: g.detach().to("cpu", torch.float64).numpy() for k, g in grads.items()}
        else:
            rows = clip_per_example(grads, clip_norm)
        for k, g in rows.items():
            summed[k] += g.sum(axis=0)
    if st.basis is not None:
        return {"coords": summed.get("coords", np.zeros(st.basis.dim))}
    return summed


def _apply(st: _State, grad: dict[str, np.ndarray]) -> None:
    if st.basis is not None:  # step the K coordinates, then theta = centre + U a
        assert st.coords is not None
        st.coords.grad = torch.from_numpy(np.ascontiguousarray(grad["coords"]))
        st.opt.step()
        st.opt.zero_grad(set_to_none=True)
        delta = st.basis.lift(st.coords.detach().numpy())
        start = 0
        with torch.no_grad():
            for k in st.keys:
                t, c = st.theta[k], st.centre[k]
                size = int(c.numel())
                move = torch.from_numpy(delta[start : start + size].reshape(tuple(c.shape)))
                t.copy_((c.double() + move).to(t.device, t.dtype))
                start += size
        return
    for k, t in st.theta.items():
        t.grad = torch.from_numpy(np.ascontiguousarray(grad[k])).to(t.device, t.dtype)
    st.opt.step()
    st.opt.zero_grad(set_to_none=True)


def validate_config(config: DPSGDConfig, n: int) -> None:
    c = config
    if not isinstance(c.steps, int) or c.steps < 1:
        raise DpaggError(f"steps={c.steps!r}: DP-SGD needs a positive number of steps (e.g. 200)")
    if not (isinstance(c.expected_batch, (int, float)) and c.expected_batch > 0):
        raise DpaggError(
            f"expected_batch={c.expected_batch!r}: must be positive (e.g. 8); the sampling rate "
            "is expected_batch / n"
        )
    if not (isinstance(c.clip_norm, (int, float)) and 0 < c.clip_norm < math.inf):
        raise DpaggError(f"clip_norm={c.clip_norm!r}: the gradient clip C_g must be positive")
    if not (isinstance(c.learning_rate, (int, float)) and 0 < c.learning_rate < math.inf):
        raise DpaggError(f"learning_rate={c.learning_rate!r}: must be positive (e.g. 5e-3)")
    if c.optimizer not in options.OPTIMIZERS:
        raise DpaggError(f"optimizer={c.optimizer!r}: use 'adam' or 'sgd'")
    if not isinstance(c.chunk_size, int) or c.chunk_size < 1:
        raise DpaggError(f"chunk_size={c.chunk_size!r}: must be a positive integer (e.g. 16)")
    if not isinstance(c.seed, int) or c.seed < 0:
        raise DpaggError(f"seed={c.seed!r}: must be an integer >= 0")
    if n < 2:
        raise DpaggError(f"the private set has {n} image(s): DP-SGD needs at least 2")


def train_dpsgd(
    backend: TIBackend,
    images: torch.Tensor,
    config: DPSGDConfig,
    *,
    target_epsilon: float | None = None,
    delta: float = DEFAULT_DELTA,
    plan: PrivacyPlan | None = None,
    neighbouring: str = "replace_one",
    before_noise: Callable[[PrivacyPlan], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    basis: Any = None,
) -> DPSGDResult:
    """Train one shared TI embedding on ``images`` ([N, 3, H, W] in [-1, 1]) with DP-SGD.

    ``basis`` (a public ``dpagg_core.privacy.basis.PublicBasis`` for this model and
    ``vectors``): public-subspace DP-SGD (module docstring): per-example gradients projected onto
    U, clipped and noised in its K coordinates, every update in span(U); checked against the model
    before ``before_noise``. None (default): plain DP-SGD on all D coordinates.

    Give either ``target_epsilon`` and ``delta`` (default ``DEFAULT_DELTA``, 1e-5; the
    noise is calibrated by PLD for T steps at q = expected_batch / N) or a ready ``plan`` (sampling
    'poisson', replace-one, with the same n, q and T); ``neighbouring`` must be 'replace_one'
    (module docstring). ``before_noise(plan)`` is called once, after every check and before the
    first noise is drawn: the place to record the spend in the ledger (docs/privacy.md invariant 5);
    if it raises, nothing is trained. Cancelling after that point still counts as spent (the
    caller's ledger already holds it). Returns the shared embedding, the public centre (initializer
    embedding), the plan and the privacy record.
    """
    check_neighbouring(neighbouring)
    check_images(images)
    n = int(images.shape[0])
    validate_config(config, n)
    q = config.sampling_rate(n)
    if plan is None:
        if target_epsilon is None:
            raise DpaggError("give target_epsilon (and delta, default 1e-5) or a ready plan")
        plan = calibrate_dpsgd(
            target_epsilon, delta, n=n, q=q, steps=config.steps, neighbouring=neighbouring
        )
    elif (
        plan.sampling != "poisson"
        or plan.n != n
        or plan.releases != config.steps
        or plan.q is None
        or not math.isclose(plan.q, q, rel_tol=1e-12)
    ):
        raise DpaggError(
            f"plan (sampling={plan.sampling}, n={plan.n}, q={plan.q}, releases={plan.releases}) "
            f"does not match the DP-SGD run (poisson, n={n}, q={q}, steps={config.steps}): "
            "build it with calibrate_dpsgd or pass target_epsilon and delta"
        )
    z = sgd_noise_multiplier(plan)
    denominator = q * n  # public expected batch size (= plan.denominator)
    st = _setup(backend, images, config, basis)
    if basis is not None:  # after prepare (a backend may name its model there), before any noise
        check_basis(
            basis,
            flat_dim=config.vectors * sum(int(d) for d in backend.embedding_dims.values()),
            base_model_id=backend.base_model_id or "",
            model_family=backend.model_family,
            vectors=config.vectors,
        )
        if set(basis.keys) != set(backend.encoder_keys):
            raise DpaggError(f"the basis has keys {basis.keys}; the model {backend.encoder_keys}")
    if before_noise is not None:
        before_noise(plan)
    for step in range(config.steps):
        if should_cancel is not None and should_cancel():
            raise Cancelled("DP-SGD cancelled; the privacy budget for this run stays spent")
        batch = mechanism._draw_subsample(plan)  # secret Poisson sample, CSPRNG; never kept
        summed = _clipped_sum(backend, st, config, [int(i) for i in batch], step, config.clip_norm)
        del batch
        noisy = noisy_mean_gradient(
            summed, clip_norm=config.clip_norm, noise_multiplier=z, denominator=denominator
        )
        _apply(st, noisy)
        if progress is not None:
            progress(step + 1, config.steps)

    record = mechanism.privacy_record(
        plan,
        config.clip_norm,
        centre_kind="initializer",
        base_model_id=backend.base_model_id or "",
    )
    record["mechanism"] = METHOD
    record["dpsgd_noise_multiplier"] = repr(float(z))
    record["steps"] = str(int(config.steps))
    if basis is not None:
        record["mechanism"] = METHOD_SUBSPACE
        record.update(basis.record())
    return DPSGDResult(
        vectors=st.result(),
        centre=st.centre,
        plan=plan,
        noise_multiplier=z,
        record=record,
    )
