"""Sanity checks and public hyper-parameter choice for the mini model.

    nice -n 19 .venv/bin/python -m bench.minimodel.tune

1. Prompted generation: judge style accuracy when the style's own words are in the prompt, for
   training styles (the model learned them) and held-out styles (compositional generalization).
2. Per-image TI (learning rate x steps) and DP-SGD (learning rate x steps at epsilon = 1) on a
   *public training style* only (``--style``, default 'desert spotted'); the held-out styles are
   never used to choose a hyper-parameter.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.dpsgd_reference import train_shared_nonprivate

from . import artifact, data, judge, sample


def _acc(jdg, imgs, style) -> float:
    return judge.style_accuracy(jdg, imgs, style)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--style", default="desert spotted")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--skip-prompts", action="store_true")
    ap.add_argument("--ti-lrs", nargs="+", type=float, default=[1e-2, 3e-2])
    ap.add_argument("--ti-steps", nargs="+", type=int, default=[100, 200])
    ap.add_argument("--dpsgd-lrs", nargs="+", type=float, default=[5e-3, 2e-2])
    ap.add_argument("--dpsgd-steps", nargs="+", type=int, default=[50, 100])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe = artifact.load_pipeline()
    jdg = artifact.load_judge()
    shapes = list(data.SHAPES)
    if not args.skip_prompts:
        for group, styles in (("train", data.TRAIN_STYLES[::3]), ("held-out", data.HELD_OUT)):
            accs = []
            for style in styles:
                imgs = sample.generate(
                    pipe, prompts=[f"a {s} in {style} style" for s in shapes for _ in range(4)]
                )
                accs.append(_acc(jdg, imgs, style))
                print(f"prompt words {group:8s} {style:16s} acc {accs[-1]:.2f}", flush=True)
            print(f"== prompt words, {group}: mean acc {np.mean(accs):.3f}", flush=True)

    from dpagg_core.training import dpsgd
    from dpagg_core.training.diffusers_backend import DiffusersBackend
    from dpagg_core.training.ti import train_vectors

    backend = DiffusersBackend.from_pipeline(pipe, model_family="sd1", device="cpu")
    style = args.style
    imgs = data.to_tensor([e.image for e in data.style_examples(style, args.n, offset=50_000)])
    for lr in args.ti_lrs:
        for steps in args.ti_steps:
            t0 = time.time()
            vec, centre = train_vectors(
                backend, imgs, artifact.ti_config(steps=steps, learning_rate=lr)
            )
            e = vec["emb_params"]
            mean = e.mean(0)
            gen = sample.generate(pipe, vectors=mean, per_template=6)
            one = sample.generate(pipe, vectors=e[0], per_template=2)
            dist = (e - centre["emb_params"]).flatten(1).norm(dim=1)
            print(
                f"TI lr={lr:g} steps={steps}: mean-embedding acc {_acc(jdg, gen, style):.2f}, "
                f"single-image acc {_acc(jdg, one, style):.2f}, ||e-centre|| median "
                f"{float(dist.median()):.3f} ({time.time() - t0:.0f}s)",
                flush=True,
            )
    base = dpsgd.DPSGDConfig(
        steps=1, expected_batch=0.25 * args.n, clip_norm=1.0, vectors=artifact.TI_VECTORS,
        initializer=artifact.TI_INITIALIZER, templates=artifact.TI_TEMPLATES, flip=False,
        chunk_size=64,
    )  # fmt: skip
    st = dpsgd._setup(backend, imgs, base)
    g = dpsgd.per_example_gradients(
        backend, st.dist, st.dist_flip, list(range(args.n)),
        {k: t.detach() for k, t in st.theta.items()}, st.templates, step=0, seed=0,
        flip=False, image_size=st.size,
    )["emb_params"]  # fmt: skip
    c_g = float(g.flatten(1).norm(dim=1).median())
    print(f"median per-example gradient norm at init: {c_g:.4g}", flush=True)
    from dataclasses import replace

    for lr in args.dpsgd_lrs:
        for steps in args.dpsgd_steps:
            t0 = time.time()
            cfg = replace(base, steps=steps, learning_rate=lr, clip_norm=c_g)
            shared = train_shared_nonprivate(backend, imgs, cfg)["emb_params"]
            acc_np = _acc(jdg, sample.generate(pipe, vectors=shared, per_template=6), style)
            res = dpsgd.train_dpsgd(backend, imgs, cfg, target_epsilon=1.0, delta=1 / (10 * args.n))
            acc_dp = _acc(
                jdg, sample.generate(pipe, vectors=res.vectors["emb_params"], per_template=6), style
            )
            print(
                f"shared TI lr={lr:g} steps={steps}: non-private acc {acc_np:.2f}, DP-SGD eps=1 "
                f"(z={res.noise_multiplier:.2f}) acc {acc_dp:.2f} ({time.time() - t0:.0f}s)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
