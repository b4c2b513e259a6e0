"""Per-image textual inversion (TI), batched, over a small backend protocol.

The training loop exists once, here. A *backend* (``dpagg_core.training.diffusers_backend`` for
diffusers pipelines, ``nodes/comfy_backend.py`` for ComfyUI MODEL/CLIP/VAE objects) knows how to
encode images, encode a prompt whose placeholder slots hold trainable vectors, add noise and run the
denoiser. It knows nothing about optimisers, seeds or batching.

Privacy reasoning (docs/privacy.md invariant 1). The DP mechanism downstream adds noise
calibrated to the
replace-one sensitivity of the *mean* of per-image embeddings, 2C/n after clipping to norm C. That
calibration is only valid if embedding i is a function of image i and public inputs alone: if
image j could influence embedding i, replacing image j would move several rows and the
sensitivity bound would be wrong. So, inside a batch:

* every image has its own trainable rows (an ``[N, v, dim]`` parameter per encoder key), and the
  frozen models process each batch element separately (no BatchNorm, no cross-sample statistics;
  CLIP and the UNet use LayerNorm/GroupNorm per sample, attention within a sample);
* the loss is the *sum* over the batch of each image's mean loss, so d loss / d row i is exactly
  d loss_i / d row i (no 1/B factor that would tie the step to the batch size);
* the optimizer is AdamW, which is element-wise: its moments, bias correction and decoupled weight
  decay of row i only read row i's gradient and value. No global gradient-norm clipping, no
  dynamic loss scaler (its global overflow skip would couple rows); every row is stepped every step;
* all randomness (timestep, diffusion noise, template, flip, posterior sample) comes from a
  per-image ``torch.Generator`` seeded from ``(seed, global image index)``, so image i sees the same
  random stream whether it is trained alone, in any batch, or on any rank of ``torchrun``.

Tests check these properties numerically in float64 (tests/test_ti.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from dpagg_core.errors import DpaggError
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.training.ti_config import (  # noqa: F401 - re-exported: the names of per-image TI
    MAX_VECTORS,
    OBJECT_TEMPLATES,
    PLACEHOLDER,
    STYLE_TEMPLATES,
    TEMPLATES,
    Cancelled,
    LatentDist,
    MixedPrecision,
    TIBackend,
    TIConfig,
    check_images,
    resolve_templates,
    validate_config,
)

log = logging.getLogger(__name__)


def keyed_seed(*key: object) -> int:
    """The one seeding rule of the TI randomness: a 63-bit seed from sha256 of the ``/``-joined
    ``key`` (a name, the user seed and public indices). Never used by the DP mechanism
    (docs/privacy.md invariant 3)."""
    digest = hashlib.sha256("/".join(str(k) for k in key).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def keyed_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded by :func:`keyed_seed` of ``key``."""
    return torch.Generator(device="cpu").manual_seed(keyed_seed(*key))


def image_seed(seed: int, index: int) -> int:
    """64-bit seed of image ``index``'s generator. Independent of batching, chunking and rank.

    This is TI randomness only (timesteps, diffusion noise, template, flip, latent sample); it is
    never used by the DP mechanism (docs/privacy.md invariant 3)."""
    return keyed_seed("dpagg-ti", int(seed), int(index))


def image_generator(seed: int, index: int) -> torch.Generator:
    return keyed_generator("dpagg-ti", int(seed), int(index))


@dataclass
class _Draw:
    template: int
    flip: bool
    timestep: int
    noise: torch.Tensor
    latent_eps: torch.Tensor


def _draw(gen: torch.Generator, n_templates: int, n_timesteps: int, shape, dtype) -> _Draw:
    """One step's randomness for one image, always in the same order and amount (so the stream
    does not depend on options such as ``flip`` or ``sample_latents``)."""
    template = int(torch.randint(n_templates, (1,), generator=gen))
    flip = bool(torch.rand((1,), generator=gen) < 0.5)
    timestep = int(torch.randint(n_timesteps, (1,), generator=gen))
    noise = torch.randn(shape, generator=gen, dtype=dtype)
    latent_eps = torch.randn(shape, generator=gen, dtype=dtype)
    return _Draw(template, flip, timestep, noise, latent_eps)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to ``size`` (antialiased bilinear), then centre crop to ``size x size``.
    Per-image operation (no statistics across the batch)."""
    n, _, h, w = images.shape
    if h == size and w == size:
        return images
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    out = torch.nn.functional.interpolate(
        images, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False
    )
    top, left = (nh - size) // 2, (nw - size) // 2
    return out[:, :, top : top + size, left : left + size].clamp(-1, 1)


def param_dtype(backend: TIBackend) -> torch.dtype:
    """Trainable vectors: float64 for float64 models (tests), float32 otherwise (master copy)."""
    return torch.float64 if backend.dtype == torch.float64 else torch.float32


def initializer_rows(backend: TIBackend, config: TIConfig) -> dict[str, torch.Tensor]:
    """The initializer's token embedding per key, ``[dim]``, applying the multi-token policy."""
    emb = backend.initializer_embedding(config.initializer)
    counts = {k: int(v.shape[0]) for k, v in emb.items()}
    if set(emb) != set(backend.encoder_keys):
        raise DpaggError(
            f"backend returned initializer keys {sorted(emb)}, expected "
            f"{list(backend.encoder_keys)}"
        )
    k = next(iter(counts.values()))
    if k == 0:
        raise DpaggError(
            f"initializer={config.initializer!r} tokenizes to nothing: give a word such as "
            "'painting'"
        )
    if k != 1 and config.multi_token_initializer == "error":
        raise DpaggError(
            f"initializer={config.initializer!r} is {k} tokens, not one: choose a single-token "
            "word (e.g. 'painting', 'style', 'photo'), or set multi_token_initializer='average' "
            "to start from the mean of its token embeddings"
        )
    return {key: v.detach().to("cpu", torch.float64).mean(0) for key, v in emb.items()}


def public_centre(
    backend: TIBackend, config: TIConfig, init: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The public centre ``[v, dim]`` float32 per key: the initializer embedding repeated over the
    ``v`` vectors. A function of the model and the (public) initializer text only."""
    init = initializer_rows(backend, config) if init is None else init
    return {
        k: init[k].to(torch.float32).expand(config.vectors, -1).clone()
        for k in backend.encoder_keys
    }


@contextlib.contextmanager
def _autocast(device: torch.device, mixed_precision: str) -> Iterator[None]:
    if device.type == "cuda" and mixed_precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        with torch.autocast("cuda", dtype=dtype):
            yield
    else:
        yield


def ti_loss_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image, ``[B]``, computed in at least float32."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    diff = pred.to(dtype) - target.to(dtype)
    return diff.pow(2).flatten(1).mean(1)


def step_latents(
    draws: Sequence[_Draw],
    dist: LatentDist,
    dist_flip: LatentDist,
    *,
    device: torch.device,
    flip: bool = True,
    sample_latents: bool = True,
) -> torch.Tensor:
    """Each image's latent for one step: its posterior mean (of the flipped copy where its draw
    flips), plus std times its own ``latent_eps`` when ``sample_latents``. Row-wise only."""
    flips = torch.tensor([flip and d.flip for d in draws], device=device).view(-1, 1, 1, 1)
    latents = torch.where(flips, dist_flip.mean, dist.mean)
    if sample_latents and dist.std is not None:
        std = torch.where(flips, dist_flip.std, dist.std)
        latents = latents + std * torch.stack([d.latent_eps for d in draws]).to(device)
    return latents


def ti_loss(
    backend: TIBackend,
    draws: Sequence[_Draw],
    latents: torch.Tensor,
    templates: Sequence[str],
    vectors: dict[str, torch.Tensor],
    *,
    image_size: int,
    mixed_precision: str = "no",
) -> torch.Tensor:
    """The TI loss of each image, ``[B]``: ``latents`` noised with each draw's noise at its
    timestep, denoised under its template holding that row of ``vectors`` (``[B, v, dim]`` per
    key). The one training-step computation of per-image TI (:func:`train_vectors`),
    :func:`evaluate_loss` and DP-SGD's per-example gradients (``dpagg_core.training.dpsgd``)."""
    device = torch.device(backend.device)
    noise = torch.stack([d.noise for d in draws]).to(device)
    t = torch.tensor([d.timestep for d in draws], device=device, dtype=torch.long)
    noisy = backend.add_noise(latents, noise, t)
    target = backend.training_target(latents, noise, t)
    with _autocast(device, mixed_precision):
        cond = backend.encode_prompts(
            [templates[d.template] for d in draws], vectors, image_size=image_size
        )
        pred = backend.predict(noisy, t, cond)
    return ti_loss_per_image(pred, target)


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------


def train_vectors(
    backend: TIBackend,
    images: torch.Tensor,
    config: TIConfig,
    *,
    image_indices: Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    stage: Callable[[str], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The training loop. Returns ``(vectors, centre)``: per key ``[N, v, dim]`` float32 (float64
    for float64 models) on CPU, and the public centre ``[v, dim]`` float32.

    ``image_indices`` are the global indices of ``images`` (they key the per-image generators);
    default ``range(N)``. ``stage(text)`` names each setup stage before it starts (preparing the
    model, encoding a chunk's latents): public text, no values. See ``train_embeddings`` for the
    privacy reasoning."""
    device = torch.device(backend.device)
    validate_config(config, device)
    check_images(images)
    n = images.shape[0]
    indices = list(range(n)) if image_indices is None else [int(i) for i in image_indices]
    if len(indices) != n or len(set(indices)) != n or min(indices) < 0:
        raise DpaggError(
            f"image_indices: need {n} distinct non-negative indices, one per image, got {indices!r}"
        )
    if config.resolution is not None:
        images = resize_center_crop(images, config.resolution)
    size = int(images.shape[-1])
    if images.shape[-2] % 8 or images.shape[-1] % 8:
        raise DpaggError(
            f"images are {images.shape[-2]}x{images.shape[-1]} px: height and width must be "
            "multiples of 8; set resolution (e.g. 512)"
        )
    if config.mixed_precision == "bf16" and device.type != "cuda":
        log.warning(
            "mixed_precision='bf16' is only used on CUDA; training in float32 on %s", device
        )

    templates = resolve_templates(config.templates)
    if stage is not None:
        stage("preparing the model (loading it, freezing its weights)")
    backend.prepare(gradient_checkpointing=config.gradient_checkpointing)
    pdtype = param_dtype(backend)
    init = initializer_rows(backend, config)
    centre = public_centre(backend, config, init)

    chunks = [list(range(s, min(s + config.batch_size, n))) for s in range(0, n, config.batch_size)]
    total = config.steps * len(chunks)
    done = 0
    out: dict[str, list[torch.Tensor]] = {k: [] for k in backend.encoder_keys}
    for chunk in chunks:
        rows = _train_chunk(
            backend,
            images[chunk],
            [indices[i] for i in chunk],
            config,
            templates,
            {k: init[k].to(pdtype) for k in init},
            pdtype,
            size,
            should_cancel,
            progress,
            done,
            total,
            stage=stage,
            label=f"images {chunk[0] + 1}-{chunk[-1] + 1} of {n}",
        )
        done += config.steps
        for k in out:
            out[k].append(rows[k])
    return {k: torch.cat(out[k], 0) for k in out}, centre


def _train_chunk(
    backend: TIBackend,
    images: torch.Tensor,
    indices: list[int],
    config: TIConfig,
    templates: tuple[str, ...],
    init: dict[str, torch.Tensor],
    pdtype: torch.dtype,
    size: int,
    should_cancel: Callable[[], bool] | None,
    progress: Callable[[int, int], None] | None,
    done: int,
    total: int,
    *,
    stage: Callable[[str], None] | None = None,
    label: str = "",
) -> dict[str, torch.Tensor]:
    device = torch.device(backend.device)
    b = images.shape[0]
    gens = [image_generator(config.seed, i) for i in indices]

    # Latents are encoded once per image (and once per flipped copy), not every step.
    if stage is not None:
        stage(f"encoding latents ({label})")
    with torch.no_grad():
        x = images.to(device)
        dist = backend.encode_images(x)
        dist_flip = backend.encode_images(x.flip(-1)) if config.flip else dist
    # Latents and draws in float32 (float64 for float64 models): the random stream of an image
    # does not depend on the VAE's storage dtype.
    ldtype = torch.promote_types(dist.mean.dtype, torch.float32)
    dist = LatentDist(dist.mean.to(ldtype), None if dist.std is None else dist.std.to(ldtype))
    dist_flip = LatentDist(
        dist_flip.mean.to(ldtype), None if dist_flip.std is None else dist_flip.std.to(ldtype)
    )
    shape = tuple(dist.mean.shape[1:])

    params = [
        torch.nn.Parameter(init[k].to(device).expand(b, config.vectors, -1).clone())
        for k in backend.encoder_keys
    ]
    lr = config.learning_rate * (config.batch_size if config.scale_lr else 1)
    # AdamW is element-wise (moments, bias correction, decoupled decay): row i's update reads
    # only row i. foreach/fused variants compute the same per-element formula.
    opt = torch.optim.AdamW(
        params,
        lr=lr,
        betas=tuple(config.adam_betas),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    warm = config.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
    )
    if stage is not None:
        stage(f"training ({label}): {config.steps} steps")
    mixed = device.type == "cuda" and config.mixed_precision in ("bf16", "fp16")
    scale = config.fp16_loss_scale if mixed and config.mixed_precision == "fp16" else 1.0
    n_t = int(backend.num_train_timesteps)

    for _ in range(config.steps):
        if should_cancel is not None and should_cancel():
            raise Cancelled("textual inversion cancelled; no embeddings were produced")
        draws = [_draw(g, len(templates), n_t, shape, ldtype) for g in gens]
        latents = step_latents(
            draws, dist, dist_flip, device=device, sample_latents=config.sample_latents
        )
        vectors = dict(zip(backend.encoder_keys, params, strict=True))
        # Sum (not mean) over images: d loss / d row i = d loss_i / d row i, batch-size free.
        loss = ti_loss(
            backend,
            draws,
            latents,
            templates,
            vectors,
            image_size=size,
            mixed_precision=config.mixed_precision,
        ).sum()
        (loss * scale).backward()
        if mixed:
            _unscale_rowwise(params, scale)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        done += 1
        if progress is not None:
            progress(done, total)
    return {k: p.detach().to("cpu") for k, p in zip(backend.encoder_keys, params, strict=True)}


def _unscale_rowwise(params: list[torch.nn.Parameter], scale: float) -> None:
    """Divide by the fixed loss scale; a row (image) whose gradient is not finite gets a zero
    gradient for this step. The decision for row i reads only row i (unlike GradScaler, whose
    global skip would let one image's overflow change every other image's trajectory)."""
    bad = None
    for p in params:
        if p.grad is None:
            continue
        p.grad.div_(scale)
        row_bad = ~torch.isfinite(p.grad).flatten(1).all(1)
        bad = row_bad if bad is None else bad | row_bad
    if bad is not None:
        for p in params:
            if p.grad is not None:
                p.grad[bad] = 0


def train_embeddings(
    backend: TIBackend,
    images: torch.Tensor,
    config: TIConfig,
    *,
    dataset_id: str = "",
    base_model_id: str | None = None,
    image_indices: Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    stage: Callable[[str], None] | None = None,
) -> EmbeddingSet:
    """Train one textual-inversion embedding per image and return them as an ``EmbeddingSet``.

    ``images``: ``[N, 3, H, W]`` in ``[-1, 1]``. All N images train together in chunks of
    ``config.batch_size``; image i has its own ``v`` vectors per encoder key, initialised to the
    initializer's token embedding. The result's ``centre`` is that embedding repeated over the
    ``v`` vectors: public (it depends only on the model and the initializer text), so it may serve
    as the clipping centre of the DP mean (docs/privacy.md invariant 2).

    Privacy: row i of the result is a deterministic function of image i, its global index,
    ``config`` and the frozen model (docs/privacy.md invariant 1) — no cross-sample normalisation,
    element-wise AdamW, no global clipping or loss-scaler skip, per-image generators. Replacing one
    image therefore changes exactly one row, which is the replace-one neighbouring relation the
    accountant assumes (sensitivity 2C/n of the clipped mean).

    ``progress(done, total)`` is called after every optimizer step (total = steps x chunks);
    ``should_cancel()`` is polled before every step and, when true, ``Cancelled`` is raised and
    nothing is returned. ``stage(text)`` names each setup stage (model preparation, latent
    encoding) before it starts. ``dataset_id`` is stored as given; ``base_model_id`` defaults to
    the backend's.
    """
    vectors, centre = train_vectors(
        backend,
        images,
        config,
        image_indices=image_indices,
        progress=progress,
        should_cancel=should_cancel,
        stage=stage,
    )
    return EmbeddingSet(
        vectors={k: t.to(torch.float32).contiguous() for k, t in vectors.items()},
        kind="textual_inversion",
        model_family=backend.model_family,
        base_model_id=backend.base_model_id if base_model_id is None else base_model_id,
        centre=centre,
        initializer=config.initializer,
        dataset_id=dataset_id,
    )


def untrained_set(
    backend: TIBackend,
    n: int,
    config: TIConfig,
    *,
    dataset_id: str = "",
    base_model_id: str | None = None,
) -> EmbeddingSet:
    """A shape-only set: ``n`` copies of the public initializer centre, the layout a trained set
    of ``n`` images would have (keys, vectors, widths, centre). No image enters it and nothing
    is trained. Used to answer an identical request from the ledger's record without training
    (``aggregate.release.release_embeddings(recorded_only=True)``); its vectors never reach the
    mechanism."""
    centre = public_centre(backend, config)
    return EmbeddingSet(
        vectors={k: c.unsqueeze(0).expand(int(n), -1, -1).contiguous() for k, c in centre.items()},
        kind="textual_inversion",
        model_family=backend.model_family,
        base_model_id=backend.base_model_id if base_model_id is None else base_model_id,
        centre=centre,
        initializer=config.initializer,
        dataset_id=dataset_id,
    )


@torch.no_grad()
def evaluate_loss(
    backend: TIBackend,
    images: torch.Tensor,
    vectors: dict[str, torch.Tensor],
    config: TIConfig,
    *,
    samples: int = 16,
    seed: int = 12345,
) -> torch.Tensor:
    """TI loss of given per-image ``vectors`` (``[N, v, dim]`` per key), ``[N, samples]``.

    Uses common random numbers: the draws depend on ``(seed, image index, sample)`` only, so two
    sets of vectors evaluated with the same seed see identical timesteps, noise and templates
    (paired comparison, e.g. before vs after training). No flip; posterior mean latents."""
    device = torch.device(backend.device)
    check_images(images)
    if config.resolution is not None:
        images = resize_center_crop(images, config.resolution)
    templates = resolve_templates(config.templates)
    backend.prepare(gradient_checkpointing=False)
    dist = backend.encode_images(images.to(device))
    ldtype = torch.promote_types(dist.mean.dtype, torch.float32)
    dist = LatentDist(dist.mean.to(ldtype), None)
    shape = tuple(dist.mean.shape[1:])
    gens = [image_generator(seed, i) for i in range(images.shape[0])]
    vec = {k: t.to(device, param_dtype(backend)) for k, t in vectors.items()}
    out = []
    for _ in range(samples):
        draws = [
            _draw(g, len(templates), int(backend.num_train_timesteps), shape, ldtype) for g in gens
        ]
        loss = ti_loss(
            backend,
            draws,
            dist.mean,
            templates,
            vec,
            image_size=int(images.shape[-1]),
            mixed_precision=config.mixed_precision,
        )
        out.append(loss.cpu())
    return torch.stack(out, 1)
