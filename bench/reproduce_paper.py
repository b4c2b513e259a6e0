"""Reproduce the paper's comparison (DPAgg-TI vs DP-SGD textual inversion) on the mini model.

    nice -n 19 .venv/bin/python bench/reproduce_paper.py --jobs 2        # documented full run
    .venv/bin/python bench/reproduce_paper.py --smoke                    # CI-sized (1 style, n=10)
    .venv/bin/python bench/reproduce_paper.py --styles "candy striped" --ns 10 50 --seeds 1

For every held-out style, private-set size n and seed (the private set is ``n`` rendered images
of the style, a different set per seed), the methods are

* ``prompt_words``  — no private data: the style's own two words in the prompt (the mini model
                      has them, but never saw them together): what composition alone gives;
* ``no_style``      — prompt without any style (the floor);
* ``ti_shared``     — non-private TI: ONE embedding trained on all n images (epsilon = inf);
* ``mean``          — non-private mean of the per-image TI embeddings (epsilon = inf);
* ``dpagg_full``    — DPAgg-TI: clipped mean of all n per-image embeddings + Gaussian noise
                      (``dpagg_core.privacy.mechanism.dp_mean``, analytic Gaussian accountant);
* ``dpagg_wor``     — DPAgg-TI with the paper's subsampling without replacement, m = n/2;
* ``dpagg_sub``     — DPAgg-TI in a PUBLIC subspace (issue 10, ``dpagg_core.aggregate.subspace``):
                      the top ``basis_k`` = 16 principal directions per vector of per-image
                      embeddings of PUBLIC images of the 26 training styles (``--basis-styles
                      public_style``: of the one public style, k = 8, the first re-run's); clip
                      (C from the same public embeddings), mean and noise in those 2k
                      coordinates, mapped back. k was chosen on training styles only
                      (``bench/choose_public_defaults.py``);
* ``dpagg_sub_js``  — the same followed by positive-part James-Stein shrinkage toward the centre
                      (``dpagg_core.aggregate.postprocess``, release-only post-processing: free);
* ``dpagg_pm``      — ``dpagg_full`` clipped around the PUBLIC mean embedding (the mean per-image
                      embedding of the basis' public images) instead of the initializer;
* ``dpagg_sub_pm``  — ``dpagg_sub`` around that public mean (the public dry run of
                      ``bench/choose_public_defaults.py`` tied it with ``dpagg_sub``; its smaller
                      public C broke the tie);
* ``dpsgd``         — DP-SGD TI (``dpagg_core.training.dpsgd``), Poisson rate q, T steps, PLD;
* ``dpsgd_sub``     — public-subspace DP-SGD TI, the fair baseline for ``dpagg_sub``: the same
                      public basis U, theta = centre + U a, per-example gradients projected onto U
                      (U^T g) before clipping, noise in those coordinates (``train_dpsgd(basis=)``);
                      its C_g is the median projected per-example gradient norm on the public style;

at epsilon in ``--epsilons`` with delta = ``--delta`` (default 1e-5, the library default; the
first comparison, in ``bench/results``, used 1/(10n)), replace-one adjacency for every DP method.
Metrics (``bench/minimodel/judge.py``): style accuracy (fraction of generated images the judge
assigns to the target style) and KID (judge feature space) against 200 real images of the style
that are not in any private set; for DPAgg also the cosine similarity between the release and the
non-private mean (raw, and centred on the public initializer embedding).

Every hyper-parameter that sets the noise (DPAgg's C, DP-SGD's C_g, and their subspace versions)
is fixed from a *public* training style (``--public-style``), never from the held-out private
images (docs/privacy.md invariant 2).
DP noise comes from the OS CSPRNG, so reruns differ even with the same seeds (by design).

Outputs in ``--out`` (default ``bench/results_v2``): ``results.jsonl`` (one line per evaluation;
an interrupted run resumes from it), ``table.md`` and ``utility_vs_epsilon.png``. ``--jobs K``
runs K single-threaded workers that claim (style, n, seed) blocks and share the results file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpagg_core.aggregate.basis_builders import basis_from_public_embeddings

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.dpsgd_reference import train_shared_nonprivate  # noqa: E402
from bench.minimodel import artifact, data, judge, sample  # noqa: E402

METHODS = (
    "prompt_words",
    "no_style",
    "ti_shared",
    "mean",
    "dpagg_full",
    "dpagg_wor",
    "dpagg_sub",
    "dpagg_sub_js",
    "dpagg_pm",
    "dpagg_sub_pm",
    "dpsgd",
    "dpsgd_sub",
)
DPAGG_METHODS = ("dpagg_full", "dpagg_wor", "dpagg_sub", "dpagg_sub_js", "dpagg_pm", "dpagg_sub_pm")
DP_METHODS = (*DPAGG_METHODS, "dpsgd", "dpsgd_sub")
# The delta of every DP row: the library default (1e-5), or "1/(10n)" (the first comparison's).
DELTA_CHOICES = ("1e-5", "1/(10n)")


@dataclass
class Settings:
    styles: list[str] = field(default_factory=lambda: list(data.HELD_OUT))
    ns: list[int] = field(default_factory=lambda: [10, 50, 200])
    epsilons: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0, 8.0])
    seeds: int = 2
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    ti_steps: int = 150
    ti_lr: float = 1e-2
    dpsgd_steps: int = 200
    dpsgd_q: float = 0.25
    dpsgd_lr: float = 5e-2
    wor_fraction: float = 0.5
    eval_per_template: int = 6
    eval_steps: int = 20
    guidance: float = 3.0
    reference: int = 200
    public_style: str = "forest striped"
    public_n: int = 16
    delta: str = "1e-5"
    # The public basis (issue 10): PCA of per-image embeddings of PUBLIC images of every training
    # style ("train", ``basis_per_style`` each) or of the one ``public_style`` ("public_style",
    # the first re-run's); k per vector chosen on training styles by choose_public_defaults.py.
    basis_k: int = 16
    basis_styles: str = "train"
    basis_per_style: int = 6

    def delta_for(self, n: int) -> float:
        return 1e-5 if self.delta == "1e-5" else 1.0 / (10 * n)


# --------------------------------------------------------------------------------------------
# Context: model, judge, backend, public hyper-parameters
# --------------------------------------------------------------------------------------------


@dataclass
class Context:
    pipe: Any
    backend: Any
    judge: Any
    centre: np.ndarray  # public initializer embedding, flat [v*dim]
    clip_norm: float  # DPAgg C (from the public style)
    grad_clip: float  # DP-SGD C_g (from the public style)
    ref_features: dict[str, np.ndarray]
    shape: tuple[int, int]  # (v, dim)
    basis: Any = None  # PublicBasis from the public style's per-image embeddings
    sub_clip_norm: float = 1.0  # C in that subspace, from the same public embeddings
    sub_grad_clip: float = 1.0  # subspace DP-SGD C_g: median public norm of U^T g
    # The public-mean centre (mean of the basis' public embeddings) and its C, full and in U.
    public_centre: Any = None
    pm_clip_norm: float = 1.0
    pm_sub_clip_norm: float = 1.0


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def images_tensor(style: str, n: int, offset: int) -> torch.Tensor:
    return data.to_tensor([e.image for e in data.style_examples(style, n, offset=offset)])


def per_image_embeddings(ctx: Context, s: Settings, imgs: torch.Tensor, seed: int) -> np.ndarray:
    from dpagg_core.training.ti import train_vectors

    cfg = artifact.ti_config(steps=s.ti_steps, learning_rate=s.ti_lr, seed=seed)
    vectors, _ = train_vectors(ctx.backend, imgs, cfg)
    return vectors["emb_params"].double().flatten(1).numpy()


def dpsgd_config(ctx: Context, s: Settings, n: int, seed: int):
    from dpagg_core.training.dpsgd import DPSGDConfig

    return DPSGDConfig(
        steps=s.dpsgd_steps,
        expected_batch=s.dpsgd_q * n,
        clip_norm=ctx.grad_clip,
        learning_rate=s.dpsgd_lr,
        optimizer="adam",
        vectors=artifact.TI_VECTORS,
        initializer=artifact.TI_INITIALIZER,
        templates=artifact.TI_TEMPLATES,
        chunk_size=64,
        flip=False,
        seed=seed,
    )


def load_model() -> tuple[Any, Any, Any, np.ndarray, int, int]:
    """The mini model's pipeline, its TI backend, the style judge, the public initializer centre
    (flat ``[v*dim]``, float64), v and dim."""
    from dpagg_core.training.diffusers_backend import DiffusersBackend

    pipe = artifact.load_pipeline()
    backend = DiffusersBackend.from_pipeline(pipe, model_family="sd1", device="cpu")
    init = backend.initializer_embedding(artifact.TI_INITIALIZER)["emb_params"][0]
    v, dim = artifact.TI_VECTORS, int(init.shape[0])
    return pipe, backend, artifact.load_judge(), init.double().repeat(v).numpy(), v, dim


def make_context(s: Settings) -> Context:
    from dpagg_core.training import dpsgd

    pipe, backend, jdg, centre, v, dim = load_model()
    # Public calibration of the clip norms on a TRAINING style (not private, not held out).
    pub = images_tensor(s.public_style, s.public_n, data.REFERENCE_OFFSET)
    tmp = Context(pipe, backend, jdg, centre, 1.0, 1.0, {}, (v, dim))
    emb = per_image_embeddings(tmp, s, pub, seed=0)
    clip_norm = float(np.median(np.linalg.norm(emb - centre, axis=1)))
    st = dpsgd._setup(backend, pub, dpsgd_config(tmp, s, s.public_n, 0))
    g = dpsgd.per_example_gradients(
        backend,
        st.dist,
        st.dist_flip,
        list(range(s.public_n)),
        {k: t.detach() for k, t in st.theta.items()},
        st.templates,
        step=0,
        seed=0,
        flip=False,
        image_size=st.size,
    )["emb_params"]
    grad_clip = float(g.flatten(1).norm(dim=1).median())
    g_flat = g.detach().to("cpu", torch.float64).flatten(1).numpy()  # [n, D], EmbeddingSet order
    # The public subspace (issue 10): PCA of the PUBLIC style's per-image embeddings, k per
    # vector, and its C: the median norm of their projected deltas (same rule as C above).
    from dpagg_core.aggregate.subspace import PublicEmbeddings

    if s.basis_styles == "train":
        basis_emb = np.concatenate(
            [
                per_image_embeddings(
                    tmp, s, images_tensor(st_, s.basis_per_style, data.REFERENCE_OFFSET), seed=0
                )
                for st_ in data.TRAIN_STYLES
            ]
        )
    else:
        basis_emb = emb
    public = PublicEmbeddings(
        vectors={"emb_params": torch.from_numpy(basis_emb.reshape(-1, v, dim)).float()},
        model_family="sd1",
        base_model_id=backend.base_model_id or "",
        centre={"emb_params": torch.from_numpy(centre.reshape(v, dim)).float()},
        initializer=artifact.TI_INITIALIZER,
    )
    basis = basis_from_public_embeddings(public, s.basis_k)
    sub_clip_norm = float(np.median(np.linalg.norm(basis.project(basis_emb - centre), axis=1)))
    # Subspace DP-SGD's C_g: the same rule as C_g, on the public gradients projected (U^T g);
    # torch's median (the lower middle value for even n) as for C_g, so C_g,sub <= C_g.
    sub_norms = np.linalg.norm(basis.project(g_flat), axis=1)
    sub_grad_clip = float(torch.from_numpy(sub_norms).median())
    public_centre = basis_emb.mean(0)
    pm_clip_norm = float(np.median(np.linalg.norm(basis_emb - public_centre, axis=1)))
    pm_sub = basis.project(basis_emb - public_centre)
    pm_sub_clip_norm = float(np.median(np.linalg.norm(pm_sub, axis=1)))
    refs = {}
    for style in s.styles:
        real = [
            e.image for e in data.style_examples(style, s.reference, offset=data.REFERENCE_OFFSET)
        ]
        refs[style] = judge.features(jdg, np.stack(real))
    _log(
        f"public calibration on {s.public_style!r}: DPAgg C = {clip_norm:.4g}, "
        f"C_g = {grad_clip:.4g}; basis from {s.basis_styles!r} ({basis_emb.shape[0]} public "
        f"embeddings), k = {s.basis_k}/vector, C_sub = {sub_clip_norm:.4g}, "
        f"C_g,sub = {sub_grad_clip:.4g}; around the public mean: C = {pm_clip_norm:.4g}, "
        f"C_sub = {pm_sub_clip_norm:.4g}"
    )
    return Context(
        pipe, backend, jdg, centre, clip_norm, grad_clip, refs, (v, dim), basis, sub_clip_norm,
        sub_grad_clip, public_centre, pm_clip_norm, pm_sub_clip_norm,
    )  # fmt: skip


def evaluate(ctx: Context, s: Settings, style: str, *, flat=None, prompts=None, seed=0) -> dict:
    if flat is not None:
        vec = torch.from_numpy(np.asarray(flat, dtype=np.float32).reshape(ctx.shape))
        imgs = sample.generate(
            ctx.pipe,
            vectors=vec,
            per_template=s.eval_per_template,
            steps=s.eval_steps,
            guidance=s.guidance,
            seed=1000 + seed,
        )
    else:
        imgs = sample.generate(
            ctx.pipe, prompts=prompts, steps=s.eval_steps, guidance=s.guidance, seed=1000 + seed
        )
    acc = judge.style_accuracy(ctx.judge, imgs, style)
    k = judge.kid(judge.features(ctx.judge, imgs), ctx.ref_features[style])
    # n_images: acc is a fraction of these; its binomial sampling error is in table().
    return {"acc": acc, "kid": k, "n_images": int(len(imgs))}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------


def _read_rows(log_path: Path) -> list[dict]:
    if not log_path.exists():
        return []
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


def _values(rows: list[dict], method: str, n: int, eps: float | None, key: str) -> list[float]:
    """``key`` of every row of one (method, n, epsilon) cell, over styles and seeds."""
    return [
        r[key]
        for r in rows
        if r["method"] == method and r["n"] == n and r["epsilon"] == eps and key in r
    ]


def _keys(rows: list[dict]) -> set[tuple]:
    return {(r["style"], r["n"], r["seed"], r["method"], r["epsilon"]) for r in rows}


def _claim_path(out: Path, style: str, n: int, seed: int) -> Path:
    return out / ".claims" / f"{style.replace(' ', '_')}-n{n}-s{seed}"


def _claim(out: Path, style: str, n: int, seed: int) -> bool:
    """Atomically claim a block for this process (``--jobs`` workers share one results file).
    A claim whose process is gone (an interrupted run) is taken over."""
    path = _claim_path(out, style, n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(path.read_text() or 0)
            os.kill(pid, 0)
            return pid == os.getpid()
        except (ValueError, ProcessLookupError):
            path.unlink(missing_ok=True)
            return _claim(out, style, n, seed)
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
    return True


def _release(out: Path, style: str, n: int, seed: int) -> None:
    _claim_path(out, style, n, seed).unlink(missing_ok=True)


def run(s: Settings, out: Path) -> list[dict]:
    from dpagg_core.aggregate import postprocess, subspace
    from dpagg_core.privacy import calibration, mechanism
    from dpagg_core.training import dpsgd

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "results.jsonl"
    rows = _read_rows(log_path)
    keys = _keys(rows)
    wanted = [
        (style, n, seed, method, eps)
        for style in s.styles
        for n, seed in [(0, 0)] + [(n, seed) for n in s.ns for seed in range(s.seeds)]
        for method in s.methods
        for eps in ([None] if method not in DP_METHODS else s.epsilons)
        if (n == 0) == (method in ("prompt_words", "no_style"))
    ]
    if all(w in keys for w in wanted):
        _log(f"all {len(wanted)} evaluations already in {log_path}")
        return rows
    ctx = make_context(s)

    def record(row: dict) -> None:
        keys.update(_keys([row]))
        with open(log_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        eps = "inf" if row["epsilon"] is None else f"{row['epsilon']:g}"
        _log(
            f"{row['style']} n={row['n']} seed={row['seed']} {row['method']} eps={eps}: "
            f"acc {row['acc']:.3f} kid {row['kid']:.4f}"
            + (f" cos {row['cos']:.3f}" if "cos" in row else "")
        )

    def todo(style, n, seed, method, eps) -> bool:
        return method in s.methods and (style, n, seed, method, eps) not in keys

    def start_block(style: str, n: int, seed: int) -> bool:
        """Re-read what other workers finished, then claim this (style, n, seed) block."""
        keys.update(_keys(_read_rows(log_path)))
        if not any(w[:3] == (style, n, seed) and w not in keys for w in wanted):
            return False
        if not _claim(out, style, n, seed):
            _log(f"{style} n={n} seed={seed}: another worker has it")
            return False
        return True

    t0 = time.time()
    shapes = list(data.SHAPES)
    # Seeds outermost: an interrupted run has every style at seed 0 before any at seed 1.
    for seed, style in [(seed, style) for seed in range(s.seeds) for style in s.styles]:
        if seed == 0 and start_block(style, 0, 0):
            try:
                base = {"style": style, "n": 0, "seed": 0}
                if todo(style, 0, 0, "prompt_words", None):
                    prompts = [
                        f"a {sh} in {style} style"
                        for sh in shapes
                        for _ in range(s.eval_per_template)
                    ]
                    record(
                        base
                        | {"method": "prompt_words", "epsilon": None}
                        | evaluate(ctx, s, style, prompts=prompts)
                    )
                if todo(style, 0, 0, "no_style", None):
                    prompts = [f"a {sh}" for sh in shapes for _ in range(s.eval_per_template)]
                    record(
                        base
                        | {"method": "no_style", "epsilon": None}
                        | evaluate(ctx, s, style, prompts=prompts)
                    )
            finally:
                _release(out, style, 0, 0)
        for n in s.ns:
            if not start_block(style, n, seed):
                continue
            try:
                delta = s.delta_for(n)
                tag = {"style": style, "n": n, "seed": seed, "delta": delta}
                imgs = images_tensor(style, n, data.PRIVATE_OFFSET + 1000 * seed)
                need_emb = todo(style, n, seed, "mean", None) or any(
                    todo(style, n, seed, m, e) for m in DPAGG_METHODS for e in s.epsilons
                )
                if need_emb:
                    t1 = time.time()
                    emb = per_image_embeddings(ctx, s, imgs, seed)
                    _log(f"per-image TI {style} n={n} seed={seed}: {time.time() - t1:.0f}s")
                    mean = emb.mean(0)
                    if todo(style, n, seed, "mean", None):
                        record(
                            tag
                            | {"method": "mean", "epsilon": None}
                            | evaluate(ctx, s, style, flat=mean, seed=seed)
                        )
                    for eps in s.epsilons:
                        for method in DPAGG_METHODS:
                            if not todo(style, n, seed, method, eps):
                                continue
                            c, cen, kind = ctx.clip_norm, ctx.centre, "initializer"
                            if method.endswith("_pm"):
                                cen, kind = ctx.public_centre, "public_mean"
                            if method == "dpagg_wor":
                                m = max(2, int(round(s.wor_fraction * n)))
                                plan = calibration.calibrate(eps, delta, n, "wor", m=m)
                            else:
                                plan = calibration.calibrate(eps, delta, n, "full")
                            if method.startswith("dpagg_sub"):
                                c = (
                                    ctx.pm_sub_clip_norm
                                    if kind == "public_mean"
                                    else ctx.sub_clip_norm
                                )
                                rel = subspace.dp_mean_projected(
                                    emb, plan=plan, clip_norm=c, basis=ctx.basis,
                                    center=cen, centre_kind=kind,
                                    base_model_id=ctx.basis.base_model_id,
                                )  # fmt: skip
                            else:
                                if kind == "public_mean":
                                    c = ctx.pm_clip_norm
                                rel = mechanism.dp_mean(
                                    emb, plan=plan, clip_norm=c, center=cen, centre_kind=kind,
                                )  # fmt: skip
                            if method == "dpagg_sub_js":
                                vec, _ = postprocess.apply(
                                    rel.vector, method="js", record=rel.record,
                                    layout=[("emb_params", *ctx.shape)], centre=ctx.centre,
                                )  # fmt: skip
                                rel = mechanism.Release(vector=vec, record=rel.record)
                            res = evaluate(ctx, s, style, flat=rel.vector, seed=seed)
                            record(
                                tag
                                | {
                                    "method": method,
                                    "epsilon": eps,
                                    "clip_norm": c,
                                    "sigma": plan.noise_std(c),
                                    "z": plan.noise_multiplier,
                                }
                                | res
                                | {
                                    "cos": _cos(rel.vector, mean),
                                    "cos_centred": _cos(rel.vector - ctx.centre, mean - ctx.centre),
                                }
                            )
                cfg = dpsgd_config(ctx, s, n, seed)
                if todo(style, n, seed, "ti_shared", None):
                    t1 = time.time()
                    shared = train_shared_nonprivate(ctx.backend, imgs, cfg)["emb_params"]
                    _log(f"shared TI {style} n={n} seed={seed}: {time.time() - t1:.0f}s")
                    flat = shared.double().flatten().numpy()
                    record(
                        tag
                        | {"method": "ti_shared", "epsilon": None}
                        | evaluate(ctx, s, style, flat=flat, seed=seed)
                    )
                # dpsgd_sub: public-subspace DP-SGD (same basis as dpagg_sub, its own public C_g).
                cfg_sub = dataclasses.replace(cfg, clip_norm=ctx.sub_grad_clip)
                for eps in s.epsilons:
                    for method, mcfg, basis in (
                        ("dpsgd", cfg, None),
                        ("dpsgd_sub", cfg_sub, ctx.basis),
                    ):
                        if not todo(style, n, seed, method, eps):
                            continue
                        t1 = time.time()
                        res = dpsgd.train_dpsgd(
                            ctx.backend, imgs, mcfg, target_epsilon=eps, delta=delta, basis=basis
                        )
                        flat = res.vectors["emb_params"].double().flatten().numpy()
                        _log(
                            f"{method} {style} n={n} eps={eps} z={res.noise_multiplier:.3g}: "
                            f"{time.time() - t1:.0f}s"
                        )
                        record(
                            tag
                            | {
                                "method": method,
                                "epsilon": eps,
                                "clip_norm": mcfg.clip_norm,
                                "sigma": res.plan.noise_std(mcfg.clip_norm),
                                "z": res.noise_multiplier,
                            }
                            | evaluate(ctx, s, style, flat=flat, seed=seed)
                        )
            finally:
                _release(out, style, n, seed)
    _log(f"experiment finished in {time.time() - t0:.0f}s")
    return _read_rows(log_path)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _ms(values: list[float], digits: int = 2) -> str:
    if not values:
        return "–"
    m = float(np.mean(values))
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {float(np.std(values, ddof=1)):.{digits}f}"


def n_images(s: Settings) -> int:
    """G: images generated per evaluation (``evaluate``: ``eval_per_template`` per template of
    ``sample.EVAL_TEMPLATES``, one per shape; the prompt references use the same count)."""
    return len(sample.EVAL_TEMPLATES) * s.eval_per_template


def sampling_error(
    rows: list[dict], method: str, n: int, eps: float | None, default_g: int
) -> float | None:
    """Binomial sampling error of a cell's mean style accuracy: sqrt(sum_i p_i (1 - p_i) / G_i)
    / k over the cell's k evaluations (p_i the accuracy, G_i its ``n_images``; ``default_g`` for
    rows written before that was recorded). The error from generating finitely many images, not
    the spread between styles. None for an empty cell."""
    cell = [
        r
        for r in rows
        if r["method"] == method and r["n"] == n and r["epsilon"] == eps and "acc" in r
    ]
    if not cell:
        return None
    var = sum(r["acc"] * (1.0 - r["acc"]) / r.get("n_images", default_g) for r in cell)
    return math.sqrt(var) / len(cell)


def table(rows: list[dict], s: Settings) -> str:
    """Markdown: per n, methods x epsilon, style accuracy and KID (mean ± std over styles x
    seeds), after each style-accuracy table its binomial sampling error per cell
    (:func:`sampling_error`), then the cosine table for DPAgg."""
    lines = []
    eps_cols = [None, *s.epsilons]
    default_g = n_images(s)
    max_se: tuple[float, str] | None = None

    ref = [r for r in rows if r["n"] == 0]
    if ref:
        lines.append("Reference prompts (no private data), over styles:\n")
        lines.append("| prompt | style accuracy | sampling error (binomial) | KID |")
        lines.append("|---|---|---|---|")
        for method in ("prompt_words", "no_style"):
            a = [r["acc"] for r in ref if r["method"] == method]
            k = [r["kid"] for r in ref if r["method"] == method]
            se = sampling_error(ref, method, 0, None, default_g)
            if a and se is not None:
                if max_se is None or se > max_se[0]:
                    max_se = (se, f"{method}, reference prompts")
                lines.append(f"| {method} | {_ms(a)} | {se:.3f} | {_ms(k, 3)} |")
        lines.append("")
    for metric, digits, title in (
        ("acc", 2, "style accuracy (higher is better)"),
        ("kid", 3, "KID (lower is better)"),
    ):
        for n in s.ns:
            lines.append(f"**n = {n}: {title}**, mean ± std over styles x seeds\n")
            head = (
                "| method | "
                + " | ".join("ε=∞" if e is None else f"ε={e:g}" for e in eps_cols)
                + " |"
            )
            lines.append(head)
            lines.append("|---" * (len(eps_cols) + 1) + "|")
            for method in ("ti_shared", "mean", *DP_METHODS):
                cells = [_ms(_values(rows, method, n, e, metric), digits) for e in eps_cols]
                if all(c == "–" for c in cells):
                    continue
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
            if metric != "acc":
                continue
            lines.append(
                f"n = {n}: sampling error of the style-accuracy mean (binomial, from the G "
                f"images per evaluation; G = {default_g} unless the row records another)\n"
            )
            lines.append(head)
            lines.append("|---" * (len(eps_cols) + 1) + "|")
            for method in ("ti_shared", "mean", *DP_METHODS):
                errs = [sampling_error(rows, method, n, e, default_g) for e in eps_cols]
                if all(x is None for x in errs):
                    continue
                for e, x in zip(eps_cols, errs, strict=True):
                    eps_txt = "∞" if e is None else f"{e:g}"
                    if x is not None and (max_se is None or x > max_se[0]):
                        max_se = (x, f"{method}, n={n}, ε={eps_txt}")
                cells = ["–" if x is None else f"{x:.3f}" for x in errs]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
        if metric == "acc" and max_se is not None:
            lines.append(
                "Largest binomial sampling error of a style-accuracy cell mean (all cells above): "
                f"{max_se[0]:.3f} ({max_se[1]}).\n"
            )
    lines.append(
        "**Cosine similarity of the DPAgg release to the non-private mean** "
        "(raw / centred on the initializer)\n"
    )
    lines.append("| method | n | " + " | ".join(f"ε={e:g}" for e in s.epsilons) + " |")
    lines.append("|---|---" + "|---" * len(s.epsilons) + "|")
    for method in DPAGG_METHODS:
        if not any(r["method"] == method for r in rows):
            continue
        for n in s.ns:
            cells = [
                " / ".join(_ms(_values(rows, method, n, e, k)) for k in ("cos", "cos_centred"))
                for e in s.epsilons
            ]
            lines.append(f"| {method} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


COLOURS = {
    "ti_shared": (120, 120, 120),
    "mean": (0, 0, 0),
    "dpagg_full": (31, 119, 180),
    "dpagg_wor": (44, 160, 44),
    "dpagg_sub": (148, 103, 189),
    "dpagg_sub_js": (255, 127, 14),
    "dpagg_pm": (140, 86, 75),
    "dpagg_sub_pm": (23, 190, 207),
    "dpsgd": (214, 39, 40),
    "dpsgd_sub": (227, 119, 194),
}


PANELS = (
    ("acc", "judge style accuracy (higher is better)", ("ti_shared", "mean", *DP_METHODS)),
    ("kid", "KID in judge features (lower is better)", ("ti_shared", "mean", *DP_METHODS)),
    ("cos_centred", "cosine to the non-private mean, centred", DPAGG_METHODS),
)


def plot(rows: list[dict], s: Settings, path: Path) -> Path:
    """One row of panels per metric (style accuracy, KID, DPAgg's cosine to the non-private
    mean), one column per n, metric vs epsilon (log x), mean over styles x seeds; dashed lines:
    the non-private references. Drawn with Pillow (matplotlib is not a dependency)."""
    from PIL import Image, ImageDraw

    pw, ph, pad, top = 360, 250, 50, 30
    width = max(720, pw * len(s.ns) + 20)
    img = Image.new("RGB", (width, top + ph * len(PANELS) + 70), "white")
    d = ImageDraw.Draw(img)
    lo, hi = math.log(min(s.epsilons)), math.log(max(s.epsilons))

    def mean_of(method: str, n: int, eps: float | None, key: str) -> float | None:
        vals = _values(rows, method, n, eps, key)
        return float(np.mean(vals)) if vals else None

    for row, (key, title, methods) in enumerate(PANELS):
        values = [r[key] for r in rows if key in r and r["n"] in s.ns]
        y_lo = min(0.0, min(values, default=0.0))
        y_hi = 1.0 if key != "kid" else max(1.0, max(values, default=1.0))
        ticks = [y_lo + (y_hi - y_lo) * k / 4 for k in range(5)]
        y_base = top + row * ph
        d.text((20, y_base - 26), title, fill="black")
        for p, n in enumerate(s.ns):
            x0, y0 = p * pw + pad, y_base
            w, h = pw - pad - 20, ph - 70

            def X(eps: float, x0: float = x0, w: float = w) -> float:
                return x0 + (math.log(eps) - lo) / max(hi - lo, 1e-9) * w

            def Y(
                v: float, y0: float = y0, h: float = h, y_lo: float = y_lo, y_hi: float = y_hi
            ) -> float:
                return y0 + (y_hi - v) / (y_hi - y_lo) * h

            d.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
            d.text((x0 + w / 2 - 20, y0 - 12), f"n = {n}", fill="black")
            for a in ticks:
                d.line([x0 - 4, Y(a), x0, Y(a)], fill="black")
                d.text((x0 - 40, Y(a) - 6), f"{a:.2f}", fill="black")
            for e in s.epsilons:
                d.line([X(e), y0 + h, X(e), y0 + h + 4], fill="black")
                d.text((X(e) - 8, y0 + h + 6), f"{e:g}", fill="black")
            d.text((x0 + w / 2 - 10, y0 + h + 20), "epsilon", fill="black")
            for method in methods:
                if method in DP_METHODS:
                    pts = [
                        (X(e), Y(v))
                        for e in s.epsilons
                        if (v := mean_of(method, n, e, key)) is not None
                    ]
                    if len(pts) > 1:
                        d.line(pts, fill=COLOURS[method], width=2)
                    for x, y in pts:
                        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLOURS[method])
                elif (v := mean_of(method, n, None, key)) is not None:
                    for xs in range(int(x0), int(x0 + w), 8):
                        d.line([xs, Y(v), xs + 4, Y(v)], fill=COLOURS[method], width=2)
    lx, ly = 20, top + ph * len(PANELS) + 10
    for method, col in COLOURS.items():
        label = method + (" (eps=inf)" if method in ("ti_shared", "mean") else "")
        if lx + 30 + 7 * len(label) > width:
            lx, ly = 20, ly + 18
        d.line([lx, ly + 6, lx + 20, ly + 6], fill=col, width=3)
        d.text((lx + 25, ly), label, fill="black")
        lx += 40 + 7 * len(label)
    d.text((20, ly + 22), "mean over held-out styles x seeds", fill="black")
    img.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--styles",
        nargs="+",
        default=None,
        help=f"held-out styles (default: {list(data.HELD_OUT)})",
    )
    ap.add_argument("--ns", nargs="+", type=int, default=None)
    ap.add_argument("--epsilons", nargs="+", type=float, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument(
        "--eval-per-template",
        type=int,
        default=None,
        help=f"generated images per template and evaluation (default 6; G = "
        f"{len(sample.EVAL_TEMPLATES)} x this); rows already in --out are kept, not redone",
    )
    ap.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    ap.add_argument(
        "--basis-k",
        type=int,
        default=None,
        help="public basis directions per vector (default 16: bench/choose_public_defaults.py)",
    )
    ap.add_argument(
        "--basis-styles",
        default=None,
        choices=("train", "public_style"),
        help="public basis from every training style (default) or only --public-style",
    )
    ap.add_argument(
        "--delta",
        default=None,
        choices=DELTA_CHOICES,
        help="delta of every DP row (default 1e-5; the first comparison used 1/(10n))",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results_v2",
        help="results folder (bench/results holds the first comparison, at delta 1/(10n))",
    )
    ap.add_argument(
        "--smoke", action="store_true", help="1 style, n=10, 2 epsilons, short training"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument(
        "--jobs", type=int, default=1, help="worker processes sharing --out (one block each)"
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--report-only", action="store_true", help="only rebuild table/plot from results.jsonl"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = Settings()
    if args.smoke:
        s = Settings(
            styles=[artifact.DEMO_STYLE], ns=[10], epsilons=[1.0, 8.0], seeds=1,
            ti_steps=40, dpsgd_steps=20, eval_per_template=2, eval_steps=10,
            reference=50, public_n=6, basis_per_style=1,
        )  # fmt: skip
    names = ("styles", "ns", "epsilons", "seeds", "methods", "delta", "eval_per_template")
    for name in (*names, "basis_k", "basis_styles"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    for style in s.styles:
        data.style_index(style)
    t0 = time.time()
    _log(f"settings: {json.dumps(asdict(s))}")
    if args.report_only:
        log_path = args.out / "results.jsonl"
        rows = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
    elif args.jobs > 1:
        argv_one = list(sys.argv[1:] if argv is None else argv)
        if "--jobs" in argv_one:
            i = argv_one.index("--jobs")
            del argv_one[i : i + 2]
        workers = [
            subprocess.Popen([sys.executable, __file__, *argv_one, "--jobs", "1", "--worker"])
            for _ in range(args.jobs)
        ]
        codes = [w.wait() for w in workers]
        if any(codes):
            _log(f"worker exit codes {codes}")
            return 1
        rows = _read_rows(args.out / "results.jsonl")
    else:
        rows = run(s, args.out)
        if args.worker:
            return 0
    md = table(rows, s)
    (args.out / "table.md").write_text(md)
    png = plot(rows, s, args.out / "utility_vs_epsilon.png")
    (args.out / "settings.json").write_text(json.dumps(asdict(s), indent=2))
    print(md)
    print(f"wrote {args.out / 'table.md'}, {png}; total runtime {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
