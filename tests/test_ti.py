"""Per-image textual inversion: the privacy properties of batched training (docs/privacy.md
invariant 1), SD1 and SDXL backends on tiny random models, learning, cancellation and config errors.

Independence is checked in float64 (``model.double()``), where the batched computation of row i
agrees with the stand-alone one to ~1e-15 and any real coupling between images (a shared
optimizer statistic, a global clip, batch-statistics layers, a shared random stream) would show
up at the 1e-3 level after a few steps.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_pipeline

from dpagg_core.errors import DpaggError
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.training.diffusers_backend import DiffusersBackend
from dpagg_core.training.ti import (
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    Cancelled,
    TIBackend,
    TIConfig,
    evaluate_loss,
    image_seed,
    resize_center_crop,
    train_embeddings,
    validate_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_sdxl_pipeline(seed: int = 0):
    """A ``StableDiffusionXLPipeline`` of tiny random components: CLIP-L-like (32 wide) and
    OpenCLIP-G-like with projection (48 wide: clip_g is the wider one), text_time UNet
    conditioning, pad '!' on tokenizer 2 as in SDXL."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from tiny_models import tiny_text_encoder, tiny_vae
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from dpagg_core.showcase.minimodel import small_clip_text_config
    from dpagg_core.training.tokenizer import clip_tokenizer

    te1 = tiny_text_encoder(32, seed=seed + 1)
    torch.manual_seed(seed + 2)
    te2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**small_clip_text_config(48, pad_token_id=0, hidden_act="gelu"))
    ).eval()
    torch.manual_seed(seed + 3)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 48,
        cross_attention_dim=32 + 48,
        norm_num_groups=8,
    ).eval()
    tok2 = clip_tokenizer()
    tok2.pad_token = "!"
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed),
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=tok2,
        unet=unet,
        scheduler=scheduler,
    )


@pytest.fixture(scope="module")
def sd1_pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def sd1_f64(sd1_pipe):
    import copy

    pipe = copy.deepcopy(sd1_pipe)
    pipe.to(torch.float64)
    return DiffusersBackend.from_pipeline(pipe, base_model_id="tiny-sd1")


@pytest.fixture(scope="module")
def sdxl_f64():
    pipe = tiny_sdxl_pipeline()
    pipe.to(torch.float64)
    return DiffusersBackend.from_pipeline(pipe, base_model_id="tiny-sdxl")


def images(n: int, seed: int, size: int = 32, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g, dtype=dtype) * 2 - 1).clamp(-1, 1)


# A config that exercises every per-row mechanism: several vectors, weight decay, warmup,
# flips, posterior sampling, random templates.
F64 = TIConfig(
    steps=3,
    learning_rate=5e-2,
    vectors=2,
    batch_size=4,
    weight_decay=1e-2,
    warmup_steps=2,
    seed=7,
)


def _vectors64(backend, imgs, config, **kw):
    from dpagg_core.training.ti import train_vectors

    vec, _ = train_vectors(backend, imgs, config, **kw)
    return vec


def _independence(backend: DiffusersBackend) -> None:
    imgs = images(3, seed=1)
    emb = backend.text_encoders[0].get_input_embeddings().weight.detach().clone()
    batched = _vectors64(backend, imgs, F64)
    assert all(t.dtype == torch.float64 for t in batched.values())
    # (a) image 1 trained alone (same global index) == its row in the batch.
    alone = _vectors64(backend, imgs[1:2], F64, image_indices=[1])
    for k in backend.encoder_keys:
        assert float((batched[k][1] - alone[k][0]).abs().max()) < 1e-9
    # Chunking (batch 2: chunks {0,1}, {2}) gives the same rows as one batch of 3.
    chunked = _vectors64(backend, imgs, F64.__class__(**{**F64.__dict__, "batch_size": 2}))
    for k in backend.encoder_keys:
        assert float((batched[k] - chunked[k]).abs().max()) < 1e-9
    # (b) replacing image 2 leaves rows 0 and 1 unchanged, and does move row 2.
    other = imgs.clone()
    other[2] = images(1, seed=99)[0]
    changed = _vectors64(backend, other, F64)
    for k in backend.encoder_keys:
        assert float((batched[k][:2] - changed[k][:2]).abs().max()) < 1e-12
        assert float((batched[k][2] - changed[k][2]).abs().max()) > 1e-6
        # Training moved every row away from the initializer (every row is updated every step).
        centre = changed[k][0, 0]
        assert float((batched[k] - centre).abs().amax(dim=(1, 2)).min()) > 1e-4
    # The token-embedding matrix (all rows: placeholders are substituted in its output) is
    # bit-identical after training.
    assert torch.equal(backend.text_encoders[0].get_input_embeddings().weight, emb)


def test_sd1_rows_are_independent_float64(sd1_f64):
    _independence(sd1_f64)


def test_sdxl_rows_are_independent_float64(sdxl_f64):
    assert sdxl_f64.encoder_keys == ("clip_l", "clip_g")
    emb2 = sdxl_f64.text_encoders[1].get_input_embeddings().weight.detach().clone()
    _independence(sdxl_f64)
    assert torch.equal(sdxl_f64.text_encoders[1].get_input_embeddings().weight, emb2)


def test_sdxl_embedding_set_and_conditioning(sdxl_f64):
    cfg = TIConfig(steps=1, vectors=3, batch_size=2, initializer="style")
    eset = train_embeddings(sdxl_f64, images(2, seed=3), cfg, dataset_id="ds-x")
    assert eset.model_family == "sdxl" and set(eset.vectors) == {"clip_l", "clip_g"}
    assert eset.vectors["clip_l"].shape == (2, 3, 32) and eset.vectors["clip_g"].shape == (2, 3, 48)
    for key, te in zip(("clip_l", "clip_g"), sdxl_f64.text_encoders, strict=True):
        tok_id = sdxl_f64.tokenizers[0]("style", add_special_tokens=False).input_ids
        row = te.get_input_embeddings().weight[tok_id[0]].float()
        assert torch.equal(eset.centre[key], row.expand(3, -1))
    # SDXL conditioning: concatenated penultimate states, pooled projection and 6 time ids.
    vec = {
        k: torch.zeros(2, 3, d, dtype=torch.float64) for k, d in (("clip_l", 32), ("clip_g", 48))
    }
    cond = sdxl_f64.encode_prompts(["a {} b", "{}"], vec, image_size=32)
    assert cond.hidden.shape == (2, 77, 80)
    assert cond.added["text_embeds"].shape == (2, 48)
    assert cond.added["time_ids"].tolist()[0] == [32, 32, 0, 0, 32, 32]


def test_placeholder_substitution_matches_embedding_rows(sd1_f64):
    """Putting vector w in the placeholder slot == a prompt whose token at that slot has
    embedding w (checked with the initializer word itself, which is a real token)."""
    be = sd1_f64
    tok = be.tokenizers[0]
    word_id = tok("painting", add_special_tokens=False).input_ids[0]
    w = be.text_encoders[0].get_input_embeddings().weight[word_id].detach()
    cond = be.encode_prompts(["a {} of a cat"], {"emb_params": w.view(1, 1, -1)}, image_size=32)
    ids = tok("a painting of a cat", padding="max_length", max_length=77, return_tensors="pt")
    ref = be.text_encoders[0](ids.input_ids).last_hidden_state
    assert float((cond.hidden - ref).abs().max()) < 1e-12


def test_embedding_set_fields(sd1_f64):
    seen = []
    cfg = TIConfig(steps=2, batch_size=2, vectors=1)
    eset = train_embeddings(
        sd1_f64,
        images(3, seed=5),
        cfg,
        dataset_id="ds-1",
        progress=lambda d, t: seen.append((d, t)),
    )
    assert isinstance(eset, EmbeddingSet)
    assert eset.kind == "textual_inversion" and eset.model_family == "sd1"
    assert eset.base_model_id == "tiny-sd1" and eset.dataset_id == "ds-1"
    assert eset.initializer == "painting" and eset.n == 3
    assert eset.vectors["emb_params"].dtype == torch.float32
    assert eset.vectors["emb_params"].shape == (3, 1, 32)
    assert eset.centre["emb_params"].shape == (1, 32)
    # 2 chunks x 2 steps, reported after every optimizer step.
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    other = train_embeddings(sd1_f64, images(3, seed=5), cfg, base_model_id="given")
    assert other.base_model_id == "given"
    assert torch.equal(other.vectors["emb_params"], eset.vectors["emb_params"])  # deterministic
    reseeded = train_embeddings(sd1_f64, images(3, seed=5), TIConfig(**{**cfg.__dict__, "seed": 1}))
    assert not torch.equal(reseeded.vectors["emb_params"], eset.vectors["emb_params"])


def test_latents_encoded_once(sd1_f64, monkeypatch):
    calls = []
    real = sd1_f64.encode_images

    def counting(x):
        calls.append(x.shape[0])
        return real(x)

    monkeypatch.setattr(sd1_f64, "encode_images", counting)
    _vectors64(sd1_f64, images(3, seed=2), TIConfig(steps=4, batch_size=2))
    # Per chunk: once for the images, once for their flips; independent of the 4 steps.
    assert calls == [2, 2, 1, 1]


def test_cancel_returns_nothing(sd1_f64):
    polls = []

    def cancel_on_third() -> bool:
        polls.append(1)
        return len(polls) >= 3

    result = None
    with pytest.raises(Cancelled):
        result = train_embeddings(
            sd1_f64, images(2, seed=0), TIConfig(steps=10), should_cancel=cancel_on_third
        )
    assert result is None and len(polls) == 3


def test_loss_goes_down_float32(sd1_pipe):
    """Trained vectors reach a lower TI loss than the initializer on the training images.

    Paired comparison with common random numbers (identical timesteps/noise/templates for both):
    the mean of 4 images x 12 draws of (loss_init - loss_trained) must exceed 5 standard errors
    (measured: about 20 standard errors after 10-30 steps).
    """
    be = DiffusersBackend.from_pipeline(sd1_pipe, base_model_id="tiny")
    imgs = images(4, seed=11, dtype=torch.float32)
    cfg = TIConfig(steps=8, learning_rate=5e-2, batch_size=4, vectors=2, templates="object")
    eset = train_embeddings(be, imgs, cfg)
    init = {k: c.expand(4, -1, -1) for k, c in eset.centre.items()}
    before = evaluate_loss(be, imgs, init, cfg, samples=12)
    after = evaluate_loss(be, imgs, eset.vectors, cfg, samples=12)
    diff = (before - after).flatten().double()
    se = float(diff.std() / diff.numel() ** 0.5)
    assert float(diff.mean()) > 5 * se, (float(diff.mean()), se)


def test_multi_token_initializer_policy(sd1_f64):
    with pytest.raises(DpaggError, match="oil painting"):
        _vectors64(sd1_f64, images(1, seed=0), TIConfig(steps=1, initializer="oil painting"))
    cfg = TIConfig(steps=1, initializer="oil painting", multi_token_initializer="average")
    eset = train_embeddings(sd1_f64, images(1, seed=0), cfg)
    ids = sd1_f64.tokenizers[0]("oil painting", add_special_tokens=False).input_ids
    assert len(ids) == 2
    rows = sd1_f64.text_encoders[0].get_input_embeddings().weight[ids]
    assert torch.allclose(eset.centre["emb_params"][0], rows.mean(0).float(), atol=1e-7)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"vectors": 0}, "vectors"),
        ({"vectors": 9}, "vectors"),
        ({"steps": 0}, "steps"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"batch_size": 0}, "batch_size"),
        ({"templates": "cats"}, "templates"),
        ({"templates": ("no placeholder",)}, "no placeholder"),
        ({"resolution": 30}, "resolution"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"multi_token_initializer": "first"}, "multi_token_initializer"),
        ({"initializer": " "}, "initializer"),
    ],
)
def test_bad_config(change, param):
    with pytest.raises(DpaggError, match=param):
        validate_config(TIConfig(**change))


def test_fp16_refused_on_cpu(sd1_f64):
    validate_config(TIConfig(mixed_precision="fp16"))  # fine without a device
    with pytest.raises(DpaggError, match="fp16"):
        validate_config(TIConfig(mixed_precision="fp16"), "cpu")
    with pytest.raises(DpaggError, match="fp16"):
        train_embeddings(sd1_f64, images(1, seed=0), TIConfig(steps=1, mixed_precision="fp16"))


def test_bad_images(sd1_f64):
    with pytest.raises(DpaggError, match=r"\[-1, 1\]"):
        train_embeddings(sd1_f64, images(1, seed=0) * 3, TIConfig(steps=1))
    with pytest.raises(DpaggError, match="images"):
        train_embeddings(sd1_f64, torch.zeros(2, 32, 32), TIConfig(steps=1))
    with pytest.raises(DpaggError, match="multiples of 8"):
        train_embeddings(sd1_f64, images(1, seed=0, size=36), TIConfig(steps=1))
    with pytest.raises(DpaggError, match="image_indices"):
        train_embeddings(sd1_f64, images(2, seed=0), TIConfig(steps=1), image_indices=[0, 0])


def test_resize_center_crop():
    x = torch.linspace(-1, 1, 3 * 40 * 64).view(1, 3, 40, 64)
    y = resize_center_crop(x, 32)
    assert y.shape == (1, 3, 32, 32) and float(y.min()) >= -1 and float(y.max()) <= 1
    assert resize_center_crop(y, 32) is y


def test_templates_and_seeds():
    assert all(t.count("{}") == 1 for t in STYLE_TEMPLATES + OBJECT_TEMPLATES)
    seeds = {image_seed(0, i) for i in range(1000)} | {image_seed(1, i) for i in range(1000)}
    assert len(seeds) == 2000 and all(0 <= s < 2**63 for s in seeds)


def test_backend_satisfies_protocol(sd1_f64):
    assert isinstance(sd1_f64, TIBackend)
    assert sd1_f64.embedding_dims == {"emb_params": 32}
    assert sd1_f64.default_resolution == 16  # tiny UNet sample_size 8 x VAE factor 2


def test_v_prediction_target(sd1_pipe):
    be = DiffusersBackend.from_pipeline(sd1_pipe, prediction_type="v_prediction")
    assert be.prediction_type == "v_prediction"
    lat, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([10, 900])
    a = be.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * noise - (1 - a).sqrt() * lat
    assert torch.allclose(be.training_target(lat, noise, t), expected, atol=1e-6)
    eps = DiffusersBackend.from_pipeline(sd1_pipe)
    assert eps.prediction_type == "epsilon" and eps.training_target(lat, noise, t) is noise


def test_gradient_checkpointing_same_result(sd1_f64):
    imgs = images(2, seed=8)
    cfg = TIConfig(steps=2, batch_size=2, learning_rate=5e-2)
    plain = _vectors64(sd1_f64, imgs, cfg)
    ckpt = _vectors64(sd1_f64, imgs, TIConfig(**{**cfg.__dict__, "gradient_checkpointing": True}))
    assert float((plain["emb_params"] - ckpt["emb_params"]).abs().max()) < 1e-12
    sd1_f64.prepare(gradient_checkpointing=False)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    foreach=st.booleans(),
    weight_decay=st.sampled_from([0.0, 1e-2, 0.5]),
    j=st.integers(1, 3),
)
def test_adamw_is_rowwise(seed, foreach, weight_decay, j):
    """torch's AdamW (as configured by the trainer) never lets row j's gradient or value reach
    row 0: same updates for row 0 when row j's gradients are replaced, over several steps."""
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(4, 2, 5, generator=g, dtype=torch.float64)
    grads = [torch.randn(4, 2, 5, generator=g, dtype=torch.float64) for _ in range(4)]
    other = [gr.clone() for gr in grads]
    for gr in other:
        gr[j] = torch.randn(2, 5, generator=g, dtype=torch.float64) * 1e3

    def run(gs):
        p = torch.nn.Parameter(init.clone())
        opt = torch.optim.AdamW([p], lr=0.1, weight_decay=weight_decay, foreach=foreach)
        for gr in gs:
            p.grad = gr.clone()
            opt.step()
        return p.detach()

    a, b = run(grads), run(other)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[j], b[j])


def test_unscale_rowwise_zeroes_only_the_rows_whose_fp16_gradient_overflowed():
    """fp16 mixed precision (CUDA only in training): the loss is multiplied by a fixed scale and
    the backward runs through half-precision activations, where one image's large gradient
    overflows to inf. ``_unscale_rowwise`` divides by the scale and zeroes that image's rows in
    every key, leaving the other images' gradients exact (a global GradScaler skip would drop the
    whole step). The same backward in real fp16 arithmetic, on the CPU."""
    from dpagg_core.training.ti import _unscale_rowwise

    scale = 1024.0
    weight = torch.tensor([1.0, 100.0, 2.0], dtype=torch.float16)  # image 1: 1024 * 100 > 65504
    params = [torch.nn.Parameter(torch.ones(3, 2, 4)), torch.nn.Parameter(torch.ones(3, 2, 6))]
    frozen = torch.nn.Parameter(torch.ones(3, 2, 4))  # no gradient: skipped
    loss = (params[0].half() * weight[:, None, None]).float().sum()
    loss = loss + (params[1].half() * 0.5).float().sum()
    (loss * scale).backward()
    assert not torch.isfinite(params[0].grad[1]).all()  # the overflow really happened in fp16
    assert torch.isfinite(params[0].grad[[0, 2]]).all() and torch.isfinite(params[1].grad).all()

    _unscale_rowwise([*params, frozen], scale)

    assert frozen.grad is None
    for p in params:
        assert torch.equal(p.grad[1], torch.zeros_like(p.grad[1]))  # every key of image 1
    assert torch.equal(params[0].grad[0], torch.full((2, 4), 1.0))
    assert torch.equal(params[0].grad[2], torch.full((2, 4), 2.0))
    assert torch.equal(params[1].grad[[0, 2]], torch.full((2, 2, 6), 0.5))
