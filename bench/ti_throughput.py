"""Per-image TI throughput: the batched engine (``dpagg_core.training.ti``) vs a sequential
per-image loop.

In one process, same model and images:

(a) **sequential**, in the style of diffusers ``examples/textual_inversion/textual_inversion.py``:
    one image at a time, batch 1, placeholder tokens added to the tokenizer, the *whole*
    token-embedding matrix trainable (dense gradient, AdamW over all rows) and the non-placeholder
    rows restored after every step, the VAE run on every step (``latent_dist.sample()``);
(b) **batched**: ``dpagg_core.training.ti.train_vectors`` with ``batch_size = N`` (latents
    encoded once, only the ``[N, v, dim]`` placeholder rows trainable).

Prints image-steps/s for each N (best of ``--repeats`` alternating runs; the batched time
includes its one-time latent encoding), the ratio b/a, and peak RSS. Default: 32 px on CPU, 12 TI
steps (real runs take thousands, so the one-time encoding is over-weighted here), two tiny SD1
models in turn (target: ratio >= 5 at N = 16 on 2 cores), both with SD1.x's layout
(cross-attention at the full-resolution level, 16 x 16 latents = 256 tokens):

* ``tiny``: ``tests/tiny_models.py`` as the tests use it, 8 heads of width 4 (and 8). PyTorch's CPU
  flash attention is inefficient for such narrow heads: ~60% of a batched step (``--profile``), a
  per-image cost that batching cannot remove, which caps the ratio; the alternatives
  (``--attention math|classic``) are slower still;
* ``tiny-wide``: the same model with 2 heads of width 16 (and 32), nearer SD1.5's 40-160 wide
  heads; here the per-step overheads that batching removes dominate.

``bench/gpu_ti.sh`` runs it on an SD1.5-shaped model (random weights) at 512 px in bf16 on CUDA
with ``--model sd15`` and also reports achieved TFLOP/s (FLOPs counted with
``torch.utils.flop_counter.FlopCounterMode``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
import resource
import sys
import time
from pathlib import Path

import torch

from dpagg_core.training.diffusers_backend import DiffusersBackend
from dpagg_core.training.ti import STYLE_TEMPLATES, TIConfig, train_vectors


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- models ---------------------------------------------------------------------------------


def sd15_pipeline(device: torch.device):
    """SD1.5-shaped components with random weights, built directly on ``device``: the default
    ``UNet2DConditionModel`` config with SD1.5's 768-wide cross-attention and 64x64 latents,
    a CLIP ViT-L/14 text encoder, and the SD ``AutoencoderKL`` (4 levels, 4 latent channels)."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from dpagg_core.training.tokenizer import CLIP_VOCAB_SIZE, clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=CLIP_VOCAB_SIZE,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
                projection_dim=768,
            )
        )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=clip_tokenizer(),
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


TINY_HEADS = {"tiny": 8, "tiny-wide": 2}
MODELS = (*TINY_HEADS, "sd15")


def build(model: str, device: torch.device, weight_dtype: torch.dtype):
    if model in TINY_HEADS:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny_models import tiny_pipeline  # test support: tests/tiny_models.py

        pipe = tiny_pipeline(heads=TINY_HEADS[model])
    else:
        pipe = sd15_pipeline(device)
    pipe.to(device)
    # As in the diffusers example: frozen UNet/VAE in the mixed-precision dtype, the text encoder
    # (whose embeddings are trained) in float32.
    if weight_dtype != torch.float32:
        pipe.unet.to(weight_dtype)
        pipe.vae.to(weight_dtype)
    return pipe


# --- (a) sequential, diffusers-example style ----------------------------------------------------


class Sequential:
    def __init__(self, pipe, vectors: int, initializer: str, lr: float, autocast) -> None:
        from dpagg_core.training.tokenizer import clip_tokenizer

        self.pipe, self.autocast, self.lr = pipe, autocast, lr
        self.device = pipe.unet.device
        self.tok = clip_tokenizer()
        self.placeholders = [f"<dpagg-p{i}>" for i in range(vectors)]
        self.tok.add_tokens(self.placeholders)
        self.te = copy.deepcopy(pipe.text_encoder).to(self.device, torch.float32)
        self.te.resize_token_embeddings(len(self.tok), mean_resizing=False)
        self.ids = self.tok.convert_tokens_to_ids(self.placeholders)
        self.init_id = self.tok(initializer, add_special_tokens=False).input_ids[0]
        self.te.requires_grad_(False)
        self.te.get_input_embeddings().requires_grad_(True)
        self.te.train()
        self.orig = self.te.get_input_embeddings().weight.detach().clone()
        self.keep = torch.ones(len(self.tok), dtype=torch.bool, device=self.device)
        self.keep[self.ids] = False
        self.scheduler = pipe.scheduler
        self.prompt = " ".join(self.placeholders)

    def train_image(self, image: torch.Tensor, steps: int) -> torch.Tensor:
        emb = self.te.get_input_embeddings()
        with torch.no_grad():
            emb.weight[self.ids] = self.orig[self.init_id]
        opt = torch.optim.AdamW(emb.parameters(), lr=self.lr, weight_decay=1e-2)
        vae, unet = self.pipe.vae, self.pipe.unet
        for _ in range(steps):
            text = random.choice(STYLE_TEMPLATES).format(self.prompt)
            ids = self.tok(
                text, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
            ).input_ids.to(self.device)
            with self.autocast():
                latents = vae.encode(image[None].to(vae.dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                t = torch.randint(0, 1000, (1,), device=self.device)
                noisy = self.scheduler.add_noise(latents, noise, t)
                hidden = self.te(ids)[0].to(unet.dtype)
                pred = unet(noisy, t, hidden).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            loss.backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():  # restore every row except the placeholders
                emb.weight[self.keep] = self.orig[self.keep]
        return emb.weight[self.ids].detach().clone()

    def run(self, images: torch.Tensor, steps: int) -> None:
        for image in images:
            self.train_image(image, steps)


# --- measurement -----------------------------------------------------------------------------


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def measure(model: str, args: argparse.Namespace, device, weight_dtype, autocast) -> None:
    """Both engines on one model, alternating; prints one table."""
    t0 = time.perf_counter()
    pipe = build(model, device, weight_dtype)
    if args.attention == "classic":
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
    backend = DiffusersBackend.from_pipeline(pipe, base_model_id=f"bench-{model}")
    seq = Sequential(pipe, args.vectors, "painting", 5e-3, autocast)
    print(
        f"model={model} device={device} res={args.resolution} steps={args.steps} "
        f"repeats={args.repeats} "
        f"vectors={args.vectors} precision={args.mixed_precision} threads={args.threads} "
        f"attention={args.attention} "
        f"(built in {time.perf_counter() - t0:.1f} s, peak RSS {peak_rss_mib():.0f} MiB)"
    )
    if device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name(device)}")

    ns = [int(x) for x in args.ns.split(",")]
    g = torch.Generator().manual_seed(0)
    all_images = torch.rand(max(ns), 3, args.resolution, args.resolution, generator=g) * 2 - 1
    all_images = all_images.to(device)

    def cfg(n: int, steps: int) -> TIConfig:
        return TIConfig(
            steps=steps,
            batch_size=n,
            vectors=args.vectors,
            mixed_precision=args.mixed_precision,
            gradient_checkpointing=args.gradient_checkpointing,
        )

    # Warm-up (allocator, kernels, lazy init) for both engines, not timed.
    seq.run(all_images[:1], 1)
    train_vectors(backend, all_images[:2], cfg(2, 1))

    header = f"{'N':>4} {'seq img-steps/s':>16} {'batched img-steps/s':>20} {'ratio b/a':>10}"
    if args.flops:
        header += f" {'seq TFLOP/s':>12} {'batched TFLOP/s':>16} {'batched it/s':>13}"
    print(header)
    for n in ns:
        imgs = all_images[:n]
        # Alternate the two engines and keep each one's best run: on a shared machine, the
        # minimum is the least disturbed measurement of the same work.
        t_seq = t_bat = float("inf")
        for _ in range(args.repeats):
            sync(device)
            start = time.perf_counter()
            seq.run(imgs, args.steps)
            sync(device)
            t_seq = min(t_seq, time.perf_counter() - start)

            start = time.perf_counter()
            train_vectors(backend, imgs, cfg(n, args.steps))
            sync(device)
            t_bat = min(t_bat, time.perf_counter() - start)

        a = n * args.steps / t_seq
        b = n * args.steps / t_bat
        line = f"{n:>4} {a:>16.2f} {b:>20.2f} {b / a:>10.2f}"
        if args.flops:
            # FLOPs of one sequential image-step (includes its VAE encode), and of the batched
            # engine per step (difference of 2-step and 1-step runs removes the one-time encode).
            f_seq = count_flops(lambda x=imgs: seq.run(x[:1], 1))
            f1 = count_flops(lambda x=imgs, n=n: train_vectors(backend, x, cfg(n, 1)))
            f2 = count_flops(lambda x=imgs, n=n: train_vectors(backend, x, cfg(n, 2)))
            f_encode = f1 - (f2 - f1)
            f_bat = (f2 - f1) * args.steps + f_encode
            line += (
                f" {f_seq * n * args.steps / t_seq / 1e12:>12.2f}"
                f" {f_bat / t_bat / 1e12:>16.2f} {args.steps / t_bat:>13.2f}"
            )
        print(line, flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        n = max(ns)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_vectors(backend, all_images[:n], cfg(n, args.steps))
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        attention = sum(e.self_cpu_time_total for e in events if "attention" in e.key)
        share = 100 * attention / total
        print(f"profile N={n}: SDPA attention kernels' self time {share:.0f}% of batched CPU time")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default="tiny,tiny-wide",
        help="comma-separated, each of tiny | tiny-wide | sd15 (default: both tiny models)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--ns", default="4,8,16", help="image-set sizes, comma separated")
    p.add_argument("--steps", type=int, default=12, help="TI steps per image in both engines")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per engine (best kept)")
    p.add_argument("--vectors", type=int, default=1)
    p.add_argument("--mixed-precision", choices=("no", "bf16"), default="no")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    p.add_argument("--flops", action="store_true", help="count FLOPs and print TFLOP/s")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--attention",
        choices=("sdpa", "math", "classic"),
        default="sdpa",
        help="UNet attention for both engines: PyTorch SDPA (default, flash on CPU), SDPA's math "
        "kernel, or diffusers' classic bmm processor",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also print the share of a batched run (largest N) spent in attention kernels",
    )
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("ti_throughput: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    bf16 = args.mixed_precision == "bf16"
    if bf16 and device.type != "cuda":
        print("ti_throughput: bf16 is benchmarked on CUDA only", file=sys.stderr)
        return 2
    weight_dtype = torch.bfloat16 if bf16 else torch.float32

    def autocast():
        if bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    models = [m.strip() for m in args.model.split(",") if m.strip()]
    for model in models:
        if model not in MODELS:
            print(f"ti_throughput: unknown --model {model!r}", file=sys.stderr)
            return 2
    kernel = contextlib.nullcontext()
    if args.attention == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = sdpa_kernel(SDPBackend.MATH)
    with kernel:
        for model in models:
            measure(model, args, device, weight_dtype, autocast)
    print(f"peak RSS {peak_rss_mib():.0f} MiB", end="")
    if device.type == "cuda":
        print(
            f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB", end=""
        )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
