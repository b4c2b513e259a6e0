"""``dpagg demo``: the whole flow on this machine, offline, in well under two minutes on a CPU.

1. A tiny Stable-Diffusion-structured model is built in code (random weights, real CLIP
   tokenizer) and saved as a diffusers folder; the bundled sample images (eight 64 px PNGs in one
   made-up style, drawn by ``bench/make_demo_samples.py``) play the private set.
2. ``dpagg run`` trains one textual-inversion embedding per image, calibrates the noise to
   epsilon = 1, releases the DP mean through a fresh ledger and writes ``demo_style.safetensors``.
3. A second release that would exceed the dataset's budget is refused before any noise is drawn.

``--aggregation-only`` skips training: a synthetic private EmbeddingSet is released instead.
With the tiny random model the embedding carries no visible style; the point is the mechanics.
"""

from __future__ import annotations

import argparse
import tempfile
from importlib import resources
from pathlib import Path

import torch

SAMPLE_COUNT = 8


def _banner(text: str) -> None:
    print(f"\n== {text}")


def _samples_dir(out: Path) -> Path:
    """Copy the bundled samples into ``out/private_images`` (the demo's 'private' folder)."""
    folder = out / "private_images"
    folder.mkdir(parents=True, exist_ok=True)
    root = resources.files("dpagg_core") / "samples"
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".png"):
            (folder / entry.name).write_bytes(entry.read_bytes())
    return folder


def _tiny_model(out: Path) -> Path:
    from .tiny import tiny_pipeline

    folder = out / "tiny_model"
    if not (folder / "model_index.json").exists():
        tiny_pipeline(hidden_size=32, seed=0).save_pretrained(folder)
    return folder


def _synthetic_set():
    from .embeddings import EmbeddingSet, dataset_id_for

    gen = torch.Generator().manual_seed(0)
    n, dim = 50, 32
    centre = torch.randn(1, dim, generator=gen)
    vectors = centre + 0.3 * torch.randn(n, 1, dim, generator=gen)
    return EmbeddingSet(
        vectors={"emb_params": vectors.float()},
        kind="textual_inversion",
        model_family="sd1",
        base_model_id="demo-synthetic",
        centre={"emb_params": centre.float()},
        initializer="painting",
        dataset_id=dataset_id_for([b"dpagg-demo-synthetic"]),
    )


def run_demo(args: argparse.Namespace) -> int:
    from .cli import main as cli_main

    out = Path(args.out_dir or tempfile.mkdtemp(prefix="dpagg-demo-")).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    ledger = out / "ledger.sqlite"
    embeddings_dir = out / "embeddings"
    print(f"dpagg demo: working in {out}")
    json_flag = ["--json"] if args.json else []

    if args.aggregation_only:
        from .embeddings import save_private

        _banner("1. a synthetic private embedding set (50 x 1 x 32)")
        private = out / "private" / "per_image.safetensors"
        if not private.exists():
            save_private(_synthetic_set(), private)
        first = [
            "aggregate",
            "--embeddings",
            str(private),
            "--epsilon",
            "1",
            "--delta",
            "1e-4",
            "--clip-norm",
            "1.0",
            "--name",
            "demo_style",
            "--out-dir",
            str(embeddings_dir),
            "--ledger",
            str(ledger),
        ]
    else:
        _banner("1. a tiny SD-structured model (built offline) and 8 bundled 'private' images")
        model = _tiny_model(out)
        images = _samples_dir(out)
        first = [
            "run",
            "--images",
            str(images),
            "--model",
            str(model),
            "--epsilon",
            "1",
            "--delta",
            "1e-3",
            "--clip-norm",
            "0.5",
            "--steps",
            "15",
            "--learning-rate",
            "0.02",
            "--batch-size",
            "8",
            "--resolution",
            "32",
            "--name",
            "demo_style",
            "--out-dir",
            str(embeddings_dir),
            "--ledger",
            str(ledger),
        ]

    second = list(first)
    second[second.index("--epsilon") + 1] = "0.5"
    second[second.index("demo_style")] = "demo_style_again"
    _banner("2. train per image (if any), calibrate to epsilon = 1, release through the ledger")
    code = cli_main([*first, *json_flag])
    if code != 0:
        return code
    target = embeddings_dir / "demo_style.safetensors"
    _banner("3. the released file, as any user would inspect it")
    cli_main(["inspect", str(target), *json_flag])

    _banner("4. a second release of the same images (epsilon 0.5) exceeds the budget of 1")
    refused = cli_main([*second, *json_flag])
    print(
        "refused as expected: nothing was drawn or recorded"
        if refused == 2
        else "UNEXPECTED: the over-budget release was not refused"
    )
    _banner("done")
    print(f"embedding : {target}")
    print(f"ledger    : {ledger}   (dpagg ledger show --ledger {ledger})")
    print("use it    : a lighthouse, in the style of embedding:demo_style")
    return 0 if refused == 2 else 1
