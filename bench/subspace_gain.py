"""How much does aggregating in a PUBLIC subspace (and free post-processing) gain? (issue 10)

    nice -n 19 .venv/bin/python bench/subspace_gain.py     # ~2 CPU-minutes (1 thread), 10 s cached
    .venv/bin/python bench/subspace_gain.py --ti-steps 40 --max-n 20 --draws 5   # quick look

A cheap proxy without image generation, on PUBLIC (training) styles of the mini model only: no
held-out style is touched, so defaults chosen from it are public choices (docs/privacy.md
invariant 2). Per style in ``AGGREGATED`` ("desert spotted", "night checked"), ``max_n`` = 50
images get one TI embedding each with the recipe of ``bench/reproduce_paper.py``
(``bench.minimodel.artifact.ti_config``, full 150 steps: 50 images take ~20 s on one core).
For n in {10, 25, 50} (the first n of the 50), epsilon in {1, 2, 4} (delta 1e-5, replace-one,
full sampling) and 20 noise draws of the REAL mechanism (``mechanism.dp_mean`` /
``subspace.dp_mean_projected``, CSPRNG noise) it reports, against the non-private mean m of the
same n embeddings (c = the public centre, the initializer embedding):

* ``cos``: cosine similarity of ``release - c`` to ``m - c`` (centred);
* ``se``: squared error ``||release - m||^2``;
* ``bias``: the cosine of the noiseless projection ``U U^T (m - c)`` to ``m - c`` (what the
  subspace can hold at best);

for the full space (today's mechanism) and public bases at k directions per vector (K = 2k
noised coordinates; the mini model's embedding is v = 2 vectors x 64 = D = 128):

* ``tt``: PCA of the whole token table (centred). Most of the mini model's 49408 rows never
  trained (the captions use 19 words), yet its top directions are not random: ``bias`` 0.67 at
  k = 8 (a random 16-dim subspace of 128 gives ~0.35). Real SD tables are fully trained; this row
  says nothing about SD;
* ``ttv``: PCA of the 19 caption words' rows only (``token_ids``; rank 18, so k <= 16);
* ``pe``: PCA of the 50 per-image embeddings of ``BASIS_STYLE`` = "forest striped", a DIFFERENT
  public style, centred (the library default; ``pe_u``: uncentred, the second moment around c);
* ``pe3``: the same, pooled over three other public styles (``BASIS_STYLES3``);

each raw (``none``), with James-Stein shrinkage (``js``), norm rescaling (``norm``) and both
(``js+norm``). C is public, calibrated in the space the clip acts in: the median norm of
"forest striped"'s (projected) deltas, as ``bench/reproduce_paper.py`` calibrates it. Norm
targets: the basis' public ``typical_norms`` (full space: the ``pe`` basis'). Public-only
releases, with no private data and no noise, give the floor: the centre c (cos 0), the origin
0, and the public mean of "forest striped".

Measured (this script, defaults; mean over 2 styles x 20 draws, so a cos has a standard error of
about 0.02-0.04): cells cos / se.

    n = 10   public-only: centre 0 / 1.47, origin 0.52 / 1.07, pub_mean 0.35 / 1.89
      basis   post      bias         eps=1         eps=2         eps=4
      full    none      1.00  0.07 / 319    0.13 / 89.1   0.22 / 26.1
      full    js        1.00  0.05 / 4.16   0.08 / 2.06   0.15 / 1.51
      full    norm      1.00  0.32 / 1.86   0.36 / 1.79   0.41 / 1.6
      tt8     none      0.69  0.13 / 17.6   0.23 / 6.05   0.39 / 2.33
      ttv8    none      0.69  0.11 / 25.5   0.22 / 7.36   0.34 / 2.87
      pe4     none      0.55  0.09 / 11.9   0.17 / 4.03   0.31 / 1.91
      pe8     none      0.78  0.13 / 28.2   0.25 / 8.46   0.39 / 3.23
      pe8     js        0.78  0.10 / 3      0.19 / 1.83   0.32 / 1.52
      pe8     norm      0.78  0.33 / 1.81   0.41 / 1.57   0.47 / 1.4
      pe8     js+norm   0.78 -0.10 / 1.87  -0.06 / 1.75   0.16 / 1.55
      pe_u8   none      0.77  0.13 / 32.1   0.17 / 10.2   0.37 / 3.11
      pe3_8   none      0.78  0.13 / 26.1   0.25 / 8.05   0.43 / 2.62
      pe16    none      0.90  0.11 / 73.9   0.23 / 20.1   0.38 / 5.76
      pe32    none      0.97  0.11 / 156    0.14 / 44.2   0.33 / 12.3
    n = 25   public-only: centre 0 / 1.34, origin 0.57 / 0.90, pub_mean 0.37 / 1.75
      full    none      1.00  0.16 / 51     0.30 / 14     0.50 / 4.26
      full    js        1.00  0.10 / 1.91   0.23 / 1.3    0.50 / 1.07
      full    norm      1.00  0.40 / 1.58   0.48 / 1.39   0.61 / 1.04
      tt8     none      0.67  0.25 / 3.48   0.41 / 1.62   0.55 / 0.988
      ttv8    none      0.65  0.24 / 4.85   0.37 / 1.87   0.52 / 1.08
      pe4     none      0.57  0.25 / 2.46   0.38 / 1.37   0.50 / 1.03
      pe8     none      0.80  0.34 / 5.04   0.51 / 1.72   0.68 / 0.85
      pe8     js        0.80  0.27 / 1.56   0.50 / 1.07   0.68 / 0.747
      pe8     norm      0.80  0.48 / 1.32   0.54 / 1.14   0.66 / 0.852
      pe8     js+norm   0.80  0.06 / 1.53   0.25 / 1.34   0.57 / 0.932
      pe_u8   none      0.79  0.31 / 5.87   0.47 / 1.95   0.63 / 0.955
      pe3_8   none      0.80  0.31 / 4.47   0.53 / 1.71   0.68 / 0.816
      pe16    none      0.91  0.26 / 11.6   0.47 / 3.45   0.66 / 1.2
      pe32    none      0.97  0.20 / 26.5   0.39 / 7.2    0.61 / 2.05
    n = 50   public-only: centre 0 / 1.22, origin 0.58 / 0.82, pub_mean 0.41 / 1.60
      full    none      1.00  0.31 / 12.3   0.50 / 3.51   0.72 / 1.07
      full    js        1.00  0.23 / 1.24   0.50 / 0.943  0.72 / 0.595
      full    norm      1.00  0.49 / 1.28   0.61 / 1      0.75 / 0.639
      tt8     none      0.67  0.43 / 1.44   0.57 / 0.899  0.64 / 0.743
      ttv8    none      0.64  0.37 / 1.65   0.51 / 1.01   0.59 / 0.808
      pe4     none      0.58  0.40 / 1.23   0.51 / 0.939  0.55 / 0.856
      pe8     none      0.81  0.48 / 1.63   0.70 / 0.683  0.77 / 0.481
      pe8     js        0.81  0.46 / 0.994  0.70 / 0.621  0.77 / 0.472
      pe8     norm      0.81  0.52 / 1.11   0.66 / 0.773  0.72 / 0.648
      pe8     js+norm   0.81  0.20 / 1.25   0.55 / 0.853  0.69 / 0.668
      pe_u8   none      0.79  0.49 / 1.8    0.66 / 0.793  0.74 / 0.551
      pe3_8   none      0.81  0.53 / 1.48   0.69 / 0.74   0.77 / 0.515
      pe16    none      0.92  0.47 / 2.93   0.69 / 0.941  0.82 / 0.437
      pe32    none      0.97  0.41 / 5.94   0.60 / 1.92   0.81 / 0.573

Reading (proposed defaults, chosen on these public styles only):

* The subspace helps: at k = 8 (K = 16 of 128) the public-embedding basis doubles the cosine of
  the full space at n <= 25, epsilon <= 2 (n = 25: 0.16 / 0.30 -> 0.34 / 0.51) and cuts the raw
  squared error 5-11x at n = 10-25. Too small a k (4) loses signal (bias 0.55), too large (32)
  brings the noise back. Default: ``--kind public_embeddings --k 8``, centred (``pe_u``
  is no better), from a public folder of a similar style (several public styles: ``pe3``, about
  the same); the token table (``tt``) is behind (n = 25: 0.25 / 0.41 vs 0.34 / 0.51) and
  untested on real SD.
* ``js`` never changes the direction and always lowers the squared error (n = 10, eps 1:
  28.2 -> 3.0 with pe8, 319 -> 4.2 in the full space); it is free and safe: proposed default.
  ``js+norm`` is not: James-Stein pulls a weak release to c, and rescaling then moves it along
  c, the wrong way here. ``norm`` alone raises the cosine at low epsilon by shortening the
  noise-inflated release, but part of that gain is the public ``-c`` direction (next point), so
  it is no default.
* Caveat of this proxy: the mean of TI embeddings is much shorter than the initializer here, so
  ``m - c`` points largely along ``-c`` (cos 0.5-0.6): the origin, a public release carrying no
  style at all, scores cos 0.52-0.58 and beats every DP release at n = 10. The cosine overstates
  how much style a release carries; only image-level metrics (``bench/reproduce_paper.py``)
  can tell, and at n = 10 no private release here is useful at epsilon <= 4.

Centre: initializer vs the mean of public embeddings (issue 10 part 3; ``centre_compare``)
------------------------------------------------------------------------------------------

    nice -n 19 .venv/bin/python bench/subspace_gain.py --only-centres    # ~10 s with the cache

The public-mean centre p (``subspace.public_mean_centre``) is the mean of the 50 "forest
striped" embeddings (the ``pe`` basis' public set); ``pe8`` is the k = 8 public-embeddings
basis. The C each centre needs, from the same PUBLIC embeddings (quantile 0.5 as above / 0.9 as
``dpagg suggest-clip-norm``): full space 2.10 / 2.38 around the initializer vs 1.72 / 1.98
around p; in pe8 1.78 / 2.14 vs 1.50 / 1.81: the public mean needs ~18 % less C (so ~18 % less
noise). Utility (C at quantile 0.5; mean over 2 styles x 20 draws), cells cos / se with cos
centred on the initializer as above (for p + js at n = 10 it is mostly p's own cos, 0.35):

    centre basis post    eps=1          eps=2          eps=4
    n = 10   (public-only floors: centre c se 1.47, origin 1.07, p 1.89)
      init  full  none   0.08 / 314     0.13 / 92.1    0.23 / 26.2
      init  full  js     0.05 / 3.8     0.09 / 2.33    0.17 / 1.57
      init  pe8   none   0.15 / 29      0.18 / 8.4     0.45 / 2.74
      init  pe8   js     0.13 / 3.35    0.12 / 1.83    0.40 / 1.25
      pmean full  none   0.06 / 211     0.14 / 60.1    0.26 / 17.5
      pmean full  js     0.30 / 4.05    0.34 / 2.27    0.38 / 1.88
      pmean pe8   none   0.12 / 19.8    0.27 / 6.53    0.44 / 2.56
      pmean pe8   js     0.30 / 2.83    0.36 / 2.17    0.45 / 1.66
    n = 25   (floors: c 1.34, origin 0.90, p 1.75)
      init  full  none   0.16 / 50.2    0.29 / 14.4    0.48 / 4.26
      init  full  js     0.10 / 1.83    0.24 / 1.36    0.48 / 1.07
      init  pe8   none   0.28 / 4.95    0.53 / 1.62    0.65 / 0.911
      init  pe8   js     0.24 / 1.43    0.49 / 1.04    0.65 / 0.792
      pmean full  none   0.18 / 33.6    0.32 / 9.72    0.53 / 2.95
      pmean full  js     0.38 / 1.98    0.42 / 1.65    0.54 / 1.25
      pmean pe8   none   0.33 / 4.05    0.50 / 1.79    0.61 / 1.1
      pmean pe8   js     0.41 / 1.75    0.50 / 1.4     0.59 / 1.08
    n = 50   (floors: c 1.22, origin 0.82, p 1.60)
      init  full  none   0.30 / 12.3    0.49 / 3.62    0.73 / 1.04
      init  full  js     0.24 / 1.24    0.49 / 0.956   0.73 / 0.583
      init  pe8   none   0.53 / 1.48    0.69 / 0.687   0.76 / 0.498
      init  pe8   js     0.52 / 0.899   0.69 / 0.629   0.76 / 0.489
      pmean full  none   0.32 / 8.68    0.53 / 2.53    0.76 / 0.741
      pmean full  js     0.46 / 1.52    0.56 / 1.16    0.73 / 0.659
      pmean pe8   none   0.52 / 1.58    0.63 / 0.998   0.67 / 0.818
      pmean pe8   js     0.53 / 1.25    0.63 / 0.963   0.67 / 0.823

With C at quantile 0.9 every raw se is 1.2-1.4x larger and the ordering is the same (run the
script for the full table, with ``cos_p``: the cosine centred on p).

Reading: in the full space the public mean's smaller C cuts the raw squared error by ~30 % at
every n and epsilon (n = 25, eps 1: 50 -> 34), cosine the same or better. In the k = 8
subspace, which already removes most of the noise, it helps only while noise dominates (n <= 25,
eps 1: se 29 -> 20, 4.95 -> 4.05) and HURTS once the signal dominates (n = 50, eps 4: se 0.50 ->
0.82, cos 0.76 -> 0.67): the basis is fitted to the public embeddings' spread around their mean,
and the style's offset from p (another style here) lies less in span(U) than its offset from
the initializer. After James-Stein the public mean only replaces c by p as the fallback; at
n = 10 no release beats the public-only floors either way. So ``public_mean`` stays an option
(``--centre public_mean --public-embeddings FILE``), not the default: the initializer with the
pe8 basis is as good or better wherever any private release beats publishing nothing (n >= 25,
eps >= 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dpagg_core.aggregate.basis_builders import basis_from_public_embeddings, basis_from_token_table

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.minimodel import artifact, data  # noqa: E402

AGGREGATED = ("desert spotted", "night checked")  # public TRAINING styles
BASIS_STYLE = "forest striped"  # a different public training style (reproduce_paper's)
BASIS_STYLES3 = ("forest striped", "fire plain", "ocean hollow")
VOCAB = ("a", "in", "style") + tuple(data.SHAPES) + tuple(data.PALETTES) + tuple(data.TEXTURES)
POSTS = ("none", "js", "norm", "js+norm")
CACHE = ROOT / "bench" / "minimodel" / "cache"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train(backend, style: str, n: int, steps: int, offset: int):
    from dpagg_core.training.public import train_public_embeddings

    imgs = data.to_tensor([e.image for e in data.style_examples(style, n, offset=offset)])
    cfg = artifact.ti_config(steps=steps, seed=0)
    return train_public_embeddings(backend, imgs, cfg)


def embeddings(backend, args) -> dict:
    """Per-image embeddings of every style used (cached per setting)."""
    styles = {s: args.max_n for s in AGGREGATED} | {s: args.basis_n for s in BASIS_STYLES3}
    out = {}
    for style, n in styles.items():
        path = CACHE / f"subspace_gain_{style.replace(' ', '_')}_{n}_{args.ti_steps}.pt"
        if path.is_file():
            out[style] = torch.load(path, weights_only=False)
            continue
        t = time.perf_counter()
        offset = 0 if style in AGGREGATED else data.REFERENCE_OFFSET
        out[style] = train(backend, style, n, args.ti_steps, offset)
        _log(f"TI {style!r}: {n} images in {time.perf_counter() - t:.0f} s")
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(out[style], path)
    return out


def pooled(pes: list):
    from dpagg_core.aggregate.subspace import PublicEmbeddings

    first = pes[0]
    return PublicEmbeddings(
        vectors={k: torch.cat([p.vectors[k] for p in pes]) for k in first.keys},
        model_family=first.model_family,
        base_model_id=first.base_model_id,
        centre=first.centre,
        initializer=first.initializer,
    )


def bases(pipe, pes: dict, ks: list[int]) -> dict:

    tok = pipe.tokenizer
    vocab_ids = sorted({i for w in VOCAB for i in tok(w, add_special_tokens=False).input_ids})
    pub = pes[BASIS_STYLE]
    pub3 = pooled([pes[s] for s in BASIS_STYLES3])
    out: dict[str, object] = {"full": None}
    for k in ks:
        out[f"tt{k}"] = basis_from_token_table(pipe.text_encoder, k, vectors=2)
        if k < len(vocab_ids) - 1:
            out[f"ttv{k}"] = basis_from_token_table(
                pipe.text_encoder, k, vectors=2, token_ids=vocab_ids
            )
        out[f"pe{k}"] = basis_from_public_embeddings(pub, k)  # centred (the default)
        out[f"pe_u{k}"] = basis_from_public_embeddings(pub, k, centred=False)
        out[f"pe3_{k}"] = basis_from_public_embeddings(pub3, k)
    return out


def flat(pe) -> np.ndarray:
    return np.concatenate([pe.vectors[k].double().flatten(1).numpy() for k in pe.keys], axis=1)


def run(args) -> dict:
    from dpagg_core.aggregate.postprocess import apply
    from dpagg_core.aggregate.subspace import dp_mean_projected
    from dpagg_core.privacy.calibration import calibrate
    from dpagg_core.privacy.mechanism import dp_mean
    from dpagg_core.training.diffusers_backend import DiffusersBackend
    from dpagg_core.training.models import base_model_id_of

    torch.set_num_threads(1)
    logging.getLogger("dpagg_core.aggregate.postprocess").setLevel(
        logging.ERROR
    )  # "JS factor 0" warnings
    pipe = artifact.load_pipeline()
    bid = base_model_id_of([pipe.text_encoder])
    backend = DiffusersBackend.from_pipeline(
        pipe, model_family="sd1", device="cpu", base_model_id=bid
    )
    pes = embeddings(backend, args)
    c = pes[BASIS_STYLE].centre["emb_params"].double().reshape(-1).numpy()  # public
    layout = [("emb_params", 2, 64)]
    allb = bases(pipe, pes, args.ks)
    pub_deltas = flat(pes[BASIS_STYLE]) - c
    pub_mean = flat(pes[BASIS_STYLE]).mean(axis=0)
    clip = {}
    for name, b in allb.items():
        x = pub_deltas if b is None else b.project(pub_deltas)
        clip[name] = float(np.median(np.linalg.norm(x, axis=1)))
    _log("public clip norms: " + ", ".join(f"{k}={v:.3g}" for k, v in clip.items()))
    norms_full = dict(allb[f"pe{args.ks[0]}"].typical_norms)
    results: dict = {}
    for style in AGGREGATED:
        emb = flat(pes[style])
        for n in args.ns:
            x = emb[:n]
            m = x.mean(axis=0)
            mc = m - c
            results.setdefault(("c_se", n), []).append(float(mc @ mc))
            # public-only releases (no private data, no noise): the floor any DP release must beat
            for name, r in (("origin", np.zeros_like(c)), ("pub_mean", pub_mean)):
                cos = float((r - c) @ mc / (np.linalg.norm(r - c) * np.linalg.norm(mc)))
                results.setdefault(("public", name, n, "cos"), []).append(cos)
                results.setdefault(("public", name, n, "se"), []).append(float((r - m) @ (r - m)))
            for name, b in [] if args.only_centres else allb.items():
                if b is not None:  # the projection's own loss (no noise, no clipping)
                    proj = b.lift(b.project(mc))
                    cosb = float(proj @ mc / (np.linalg.norm(proj) * np.linalg.norm(mc)))
                    results.setdefault(("bias_cos", name, n), []).append(cosb)
                for eps in args.epsilons:
                    plan = calibrate(eps, args.delta, n, "full")
                    for _ in range(args.draws):
                        if b is None:
                            rel = dp_mean(
                                x,
                                plan=plan,
                                clip_norm=clip[name],
                                center=c,
                                centre_kind="initializer",
                            )
                        else:
                            rel = dp_mean_projected(
                                x,
                                plan=plan,
                                clip_norm=clip[name],
                                basis=b,
                                center=c,
                                centre_kind="initializer",
                                base_model_id=bid,
                            )
                        for post in POSTS:
                            norms = norms_full if b is None else dict(b.typical_norms)
                            vec, _ = apply(
                                rel.vector,
                                method=post,
                                record=rel.record,
                                layout=layout,
                                centre=c,
                                target_norms=norms,
                            )
                            d = vec - c
                            nd = np.linalg.norm(d)
                            cos = float(d @ mc / (nd * np.linalg.norm(mc))) if nd > 0 else 0.0
                            se = float((vec - m) @ (vec - m))
                            key = (name, post, n, eps)
                            results.setdefault(key + ("cos",), []).append(cos)
                            results.setdefault(key + ("se",), []).append(se)
    if args.centres:
        results.update(centre_compare(args, pes, allb, c, bid, layout))
    return {"results": results, "clip": clip, "names": list(allb)}


CENTRE_BASES = ("full", "pe8")
CENTRE_POSTS = ("none", "js")
QUANTILES = (0.5, 0.9)  # the bench's median rule and suggest-clip-norm's default (0.9)


def centre_compare(args, pes: dict, allb: dict, c: np.ndarray, bid: str, layout) -> dict:
    """Initializer centre vs public-mean centre (issue 10 part 3), public styles only.

    The public mean p is the mean per-image embedding of ``BASIS_STYLE`` (public; the same
    embeddings the ``pe`` basis is built from). For each centre, C is set from those PUBLIC
    embeddings by a quantile of their (projected) distances to the centre (``QUANTILES``: 0.5 as
    above, 0.9 as ``dpagg suggest-clip-norm``); then the real mechanism releases around that
    centre. Reported per cell: ``cos`` (centred on the initializer c, comparable with the main
    table), ``cos_p`` (centred on p: the part of the style that public data does not already
    give) and ``se`` = ||release - m||^2.
    """
    from dpagg_core.aggregate.postprocess import apply
    from dpagg_core.aggregate.subspace import dp_mean_projected, public_mean_centre
    from dpagg_core.privacy.calibration import calibrate
    from dpagg_core.privacy.mechanism import dp_mean

    pc = public_mean_centre(pes[BASIS_STYLE])  # type-checked: PublicEmbeddings only
    p = pc.flat()
    centres = {"initializer": c, "public_mean": p}
    pub = flat(pes[BASIS_STYLE])
    out: dict = {}
    clips = {}
    for cname, cen in centres.items():
        for bname in CENTRE_BASES:
            b = allb[bname]
            d = pub - cen if b is None else b.project(pub - cen)
            dist = np.linalg.norm(d, axis=1)
            for qt in QUANTILES:
                clips[(cname, bname, qt)] = float(np.quantile(dist, qt))
    _log(
        "centre C (quantile 0.5 / 0.9): "
        + ", ".join(
            f"{cn}/{bn}={clips[(cn, bn, 0.5)]:.3g}/{clips[(cn, bn, 0.9)]:.3g}"
            for cn in centres
            for bn in CENTRE_BASES
        )
    )
    for k, v in clips.items():
        out[("centre_clip",) + k] = [v]
    for style in AGGREGATED:
        emb = flat(pes[style])
        for n in args.ns:
            x = emb[:n]
            m = x.mean(axis=0)
            mc, mp = m - c, m - p
            for cname, cen in centres.items():
                for bname in CENTRE_BASES:
                    b = allb[bname]
                    for qt in QUANTILES:
                        cn = clips[(cname, bname, qt)]
                        for eps in args.epsilons:
                            plan = calibrate(eps, args.delta, n, "full")
                            for _ in range(args.draws):
                                kw = dict(plan=plan, clip_norm=cn, center=cen, centre_kind=cname)
                                if b is None:
                                    rel = dp_mean(x, **kw)
                                else:
                                    rel = dp_mean_projected(x, basis=b, base_model_id=bid, **kw)
                                for post in CENTRE_POSTS:
                                    vec, _ = apply(
                                        rel.vector,
                                        method=post,
                                        record=rel.record,
                                        layout=layout,
                                        centre=cen,
                                    )
                                    key = ("centre", cname, bname, qt, post, n, eps)
                                    for tag, ref, target in (("cos", c, mc), ("cos_p", p, mp)):
                                        dv = vec - ref
                                        nd = np.linalg.norm(dv) * np.linalg.norm(target)
                                        cos = float(dv @ target / nd) if nd > 0 else 0.0
                                        out.setdefault(key + (tag,), []).append(cos)
                                    se = float((vec - m) @ (vec - m))
                                    out.setdefault(key + ("se",), []).append(se)
    return out


def centre_table(out: dict, args) -> str:
    res = out["results"]
    if not any(k[0] == "centre_clip" for k in res):
        return ""
    lines = [
        "\nCentre comparison: initializer (init) vs public mean (pmean); cells cos / cos_p / se"
    ]
    lines.append(
        "| centre | basis | C rule | C | post | n | "
        + " | ".join(f"eps={e:g}" for e in args.epsilons)
        + " |"
    )
    lines.append("|---" * (6 + len(args.epsilons)) + "|")
    for cname in ("initializer", "public_mean"):
        for bname in CENTRE_BASES:
            for qt in QUANTILES:
                cn = res[("centre_clip", cname, bname, qt)][0]
                for post in CENTRE_POSTS:
                    for n in args.ns:
                        cells = []
                        for eps in args.epsilons:
                            key = ("centre", cname, bname, qt, post, n, eps)
                            cells.append(
                                f"{np.mean(res[key + ('cos',)]):.2f} / "
                                f"{np.mean(res[key + ('cos_p',)]):.2f} / "
                                f"{np.mean(res[key + ('se',)]):.3g}"
                            )
                        lines.append(
                            f"| {cname} | {bname} | q{qt:g} | {cn:.3g} | {post} | {n} | "
                            + " | ".join(cells)
                            + " |"
                        )
    return "\n".join(lines)


def table(out: dict, args) -> str:
    res = out["results"]
    lines = []
    for n in args.ns:
        c_se = np.mean(res[("c_se", n)])
        public = ", ".join(
            f"{name} {np.mean(res[('public', name, n, 'cos')]):.2f} / "
            f"{np.mean(res[('public', name, n, 'se')]):.3g}"
            for name in ("origin", "pub_mean")
        )
        lines.append(
            f"\nn = {n}: cells cos / se at epsilon; public-only releases (cos / se): centre "
            f"0 / {c_se:.3g}, {public}"
        )
        head = "| basis | post | bias_cos | " + " | ".join(f"eps={e:g}" for e in args.epsilons)
        lines.append(head + " |")
        lines.append("|---" * (3 + len(args.epsilons)) + "|")
        for name in out["names"]:
            bias = res.get(("bias_cos", name, n))
            bias_s = "1" if bias is None else f"{np.mean(bias):.2f}"
            for post in POSTS:
                cells = []
                for eps in args.epsilons:
                    cos = np.mean(res[(name, post, n, eps, "cos")])
                    se = np.mean(res[(name, post, n, eps, "se")])
                    cells.append(f"{cos:.2f} / {se:.3g}")
                lines.append(f"| {name} | {post} | {bias_s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ti-steps", type=int, default=150)
    p.add_argument("--max-n", type=int, default=50)
    p.add_argument("--basis-n", type=int, default=50)
    p.add_argument("--ns", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--json", type=Path, default=None, help="also write the raw means as JSON")
    p.add_argument(
        "--no-centres", dest="centres", action="store_false", help="skip the centre comparison"
    )
    p.add_argument(
        "--only-centres", action="store_true", help="only the centre comparison (k = 8 bases)"
    )
    args = p.parse_args(argv)
    args.ns = [n for n in args.ns if n <= args.max_n]
    if args.only_centres:
        args.ks = [8]
    t = time.perf_counter()
    out = run(args)
    if not args.only_centres:
        print(table(out, args))
    print(centre_table(out, args))
    if args.json:
        flat_res = {"|".join(map(str, k)): float(np.mean(v)) for k, v in out["results"].items()}
        args.json.write_text(json.dumps({"clip": out["clip"], "means": flat_res}, indent=1))
    _log(f"done in {time.perf_counter() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
