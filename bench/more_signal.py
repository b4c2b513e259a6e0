"""More signal per image (issue 21 item 4), measured on PUBLIC training styles only.

    nice -n 19 .venv/bin/python bench/more_signal.py embed --variant v2     # per-image TI, cached
    nice -n 19 .venv/bin/python bench/more_signal.py analyze --variants v2 v1 ...
    .venv/bin/python bench/more_signal.py --plot-only   # results_v4/utility_vs_epsilon.png, ~1 s

``embed`` trains the per-image TI embeddings of one per-image TI variant (:data:`VARIANTS`) for
``--per-style`` public images of each of the 26 training styles (``data.REFERENCE_OFFSET``, as in
``bench/snr_geometry.py``) and for ``--n`` further images of each of the 4 validation styles of
``bench/choose_public_defaults.py`` (``REFERENCE_OFFSET + 500``, disjoint), and caches them under
``bench/minimodel/cache/more_signal/`` (git-ignored). No held-out style is read.

``analyze`` reads the caches and, per variant and per k per vector in ``--ks``:

* the geometry (the ``snr_geometry`` estimator): basis = per-vector PCA of the 22 fitting styles'
  public embeddings, centre = their mean, C = median norm of their projected deltas, rho = the
  unbiased norm of the mean clipped delta / C, per fitting style (6 images) and per validation
  style (its ``--n`` images); SNR = rho n / (2 z sqrt K) at (``--n``, ``--epsilon``);
* the judge's style accuracy on the validation styles (``--draws`` noise draws each): the
  non-private mean, its projection, and the private release (subspace, public-mean centre) raw
  and post-processed with ``js``, ``wiener``, ``norm`` and ``wiener+norm``
  (``dpagg_core.aggregate.postprocess``; the prior and the typical norm come from the 22 fitting
  styles only).

Writes ``--out`` (JSON lines, one row per variant and k).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.minimodel import artifact, data  # noqa: E402

CACHE = ROOT / "bench" / "minimodel" / "cache" / "more_signal"
VALIDATION_INDICES = (0, 7, 14, 21)  # as bench/choose_public_defaults.py
VAL_OFFSET = data.REFERENCE_OFFSET + 500
# name: TIConfig overrides (the mini model's recipe otherwise: 2 vectors, no flip, 150 steps)
VARIANTS: dict[str, dict] = {
    "v2": dict(vectors=2, flip=False, steps=150),
    "v1": dict(vectors=1, flip=False, steps=150),
    "v2_flip": dict(vectors=2, flip=True, steps=150),
    "v1_flip": dict(vectors=1, flip=True, steps=150),
    "v1_75": dict(vectors=1, flip=False, steps=75),
    "v2_75": dict(vectors=2, flip=False, steps=75),
}
POSTPROCESS = ("none", "js", "wiener", "norm", "wiener+norm")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def embed(variant: str, per_style: int, n: int) -> Path:
    from bench.reproduce_paper import load_model
    from dpagg_core.training.ti import train_vectors

    _, backend, _, _, _, _ = load_model()
    cfg = artifact.ti_config(learning_rate=1e-2, **VARIANTS[variant])
    train = list(data.TRAIN_STYLES)
    val = [train[i] for i in VALIDATION_INDICES]
    t0 = time.time()

    def ti(style: str, count: int, offset: int) -> np.ndarray:
        imgs = data.to_tensor([e.image for e in data.style_examples(style, count, offset=offset)])
        vec, _ = train_vectors(backend, imgs, cfg)
        return vec["emb_params"].double().flatten(1).numpy()

    # all public images of all training styles in one batch (the trajectories are per image)
    imgs = [
        e.image
        for s in train
        for e in data.style_examples(s, per_style, offset=data.REFERENCE_OFFSET)
    ]
    vec, _ = train_vectors(backend, data.to_tensor(imgs), cfg)
    public = vec["emb_params"].double().flatten(1).numpy().reshape(len(train), per_style, -1)
    _log(f"{variant}: public TI {len(train)} x {per_style} ({time.time() - t0:.0f}s)")
    valsets = np.stack([ti(s, n, VAL_OFFSET) for s in val])
    _log(f"{variant}: validation TI {len(val)} x {n} ({time.time() - t0:.0f}s)")
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{variant}_p{per_style}_n{n}.npz"
    np.savez(path, public=public, val=valsets, styles=np.array(train), val_styles=np.array(val),
             seconds=time.time() - t0)  # fmt: skip
    _log(f"wrote {path}")
    return path


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


def unbiased_rho(u: np.ndarray) -> float:
    m = len(u)
    mu2 = (m * float(np.sum(u.mean(0) ** 2)) - float(np.mean(np.sum(u**2, axis=1)))) / (m - 1)
    return float(np.sqrt(max(mu2, 0.0)))


def analyze(a: argparse.Namespace) -> None:
    from bench.minimodel import judge, sample
    from bench.reproduce_paper import load_model
    from dpagg_core.aggregate import postprocess
    from dpagg_core.aggregate.basis_builders import basis_from_public_embeddings
    from dpagg_core.aggregate.subspace import PublicEmbeddings, dp_mean_projected
    from dpagg_core.privacy import calibration

    pipe, backend, jdg, init1, _, dim = load_model()
    init_tok = init1[:dim]
    plan = calibration.calibrate(a.epsilon, 1e-5, a.n, "full")
    z = plan.noise_multiplier
    out = []
    for variant in a.variants:
        f = np.load(CACHE / f"{variant}_p{a.per_style}_n{a.n}.npz")
        public, valsets = f["public"], f["val"]
        styles = [str(s) for s in f["styles"]]
        val = [str(s) for s in f["val_styles"]]
        fit_idx = [i for i, s in enumerate(styles) if s not in val]
        v = public.shape[-1] // dim
        centre_init = np.tile(init_tok, v)
        fit_rows = public[fit_idx].reshape(-1, v * dim)
        pe = PublicEmbeddings(
            vectors={"emb_params": torch.from_numpy(fit_rows.reshape(-1, v, dim)).float()},
            model_family="sd1",
            base_model_id=backend.base_model_id or "",
            centre={"emb_params": torch.from_numpy(centre_init.reshape(v, dim)).float()},
            initializer=artifact.TI_INITIALIZER,
        )
        cen = fit_rows.mean(0)
        layout = [("emb_params", v, dim)]

        def accuracy(flat: np.ndarray, style: str, seed: int = 0, v=v) -> float:
            vec = torch.from_numpy(np.asarray(flat, dtype=np.float32).reshape(v, dim))
            imgs = sample.generate(
                pipe, vectors=vec, per_template=6, steps=20, guidance=3.0, seed=1000 + seed
            )
            return float(judge.style_accuracy(jdg, imgs, style))

        nonpriv = [accuracy(valsets[i].mean(0), s) for i, s in enumerate(val)] if a.accuracy else []
        for k in a.ks:
            t0 = time.time()
            basis = basis_from_public_embeddings(pe, k)
            y = basis.project(fit_rows - cen)
            c = float(np.median(np.linalg.norm(y, axis=1)))
            kk = basis.dim

            def rho_of(rows: np.ndarray, basis=basis, c=c, cen=cen) -> float:
                ys = basis.project(rows - cen)
                u = ys * np.minimum(1.0, c / np.linalg.norm(ys, axis=1, keepdims=True)) / c
                return unbiased_rho(u)

            rho_fit = [rho_of(public[i]) for i in fit_idx]
            rho_val = [rho_of(valsets[i]) for i in range(len(val))]

            def snr(r: float, kk=kk) -> float:
                return r * a.n / (2 * z * np.sqrt(kk))

            # the public prior: per-style means of the fitting styles (clipped per image, as the
            # release's expectation is), in the basis coordinates around the public centre
            prior = postprocess.WienerPrior.from_style_means(
                [public[i] for i in fit_idx], basis=basis, centre=cen, clip_norm=c
            )
            style_norms = [
                np.linalg.norm(public[i].mean(0).reshape(v, dim), axis=1).mean() for i in fit_idx
            ]
            target = float(np.median(style_norms))
            row = {
                "variant": variant,
                **VARIANTS[variant],
                "k_per_vector": k,
                "K": kk,
                "C": c,
                "z": z,
                "n": a.n,
                "epsilon": a.epsilon,
                "rho_fit_median": float(np.median(rho_fit)),
                "rho_fit_min": float(np.min(rho_fit)),
                "rho_fit_max": float(np.max(rho_fit)),
                "rho_val": rho_val,
                "snr_fit_median": float(snr(np.median(rho_fit))),
                "snr_val_median": float(snr(np.median(rho_val))),
                # how much of a validation style's delta (around the release's centre) the
                # basis keeps: the release can at best give the projection
                "cos_projected_val": [
                    _cos(
                        basis.lift(basis.project(valsets[i].mean(0) - cen)),
                        valsets[i].mean(0) - cen,
                    )
                    for i in range(len(val))
                ],
                "prior_lambda_median": float(np.median(prior.variances)),
                "sigma": float(plan.noise_std(c)),
                "target_norm": target,
            }
            if a.accuracy:
                row["acc_nonprivate"] = nonpriv
                row["acc_projected"] = [
                    accuracy(cen + basis.lift(basis.project(valsets[i].mean(0) - cen)), s)
                    for i, s in enumerate(val)
                ]
                accs: dict[str, list[list[float]]] = {m: [] for m in a.postprocess}
                cos: dict[str, list[float]] = {m: [] for m in a.postprocess}
                for i, s in enumerate(val):
                    per = {m: [] for m in a.postprocess}
                    truth = valsets[i].mean(0) - cen
                    for draw in range(a.draws):
                        torch.manual_seed(10_000 * i + draw)
                        rel = dp_mean_projected(
                            valsets[i], plan=plan, clip_norm=c, basis=basis, center=cen,
                            centre_kind="public_mean", base_model_id=basis.base_model_id,
                        )  # fmt: skip
                        for m in a.postprocess:
                            vec, _ = postprocess.apply(
                                rel.vector, method=m, record=rel.record, layout=layout, centre=cen,
                                target_norms={"emb_params": target}, prior=prior,
                            )  # fmt: skip
                            d = vec - cen
                            cos[m].append(
                                float(
                                    d @ truth / (np.linalg.norm(d) * np.linalg.norm(truth) + 1e-12)
                                )
                            )
                            per[m].append(accuracy(vec, s, seed=draw))
                    for m in a.postprocess:
                        accs[m].append(per[m])
                row["acc_release"] = accs
                row["cos_release"] = {m: float(np.mean(x)) for m, x in cos.items()}
                row["draws"] = a.draws
            row["seconds"] = round(time.time() - t0)
            out.append(row)
            _log(json.dumps({k_: v_ for k_, v_ in row.items() if k_ not in ("rho_val",)})[:900])
            a.out.parent.mkdir(parents=True, exist_ok=True)
            with a.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")


def heldout(a: argparse.Namespace) -> None:
    """The chosen recipe on HELD-OUT styles (never used for choosing): per (style, n, seed) the
    per-image TI of ``reproduce_paper``'s private set (``PRIVATE_OFFSET + 1000 seed``, TI seed =
    seed), the non-private mean, and ``--draws`` releases per epsilon in the basis of ALL 26
    public training styles (cached by ``embed``) around their mean, C = median projected norm, with
    ``--postprocess`` (the Wiener prior from the 26 public styles). Accuracy as in
    ``reproduce_paper.evaluate`` (6 per template, 20 steps, sampler seed 1000 + seed)."""
    from bench.minimodel import judge, sample
    from bench.reproduce_paper import load_model
    from dpagg_core.aggregate import postprocess
    from dpagg_core.aggregate.basis_builders import basis_from_public_embeddings
    from dpagg_core.aggregate.subspace import PublicEmbeddings, dp_mean_projected
    from dpagg_core.privacy import calibration
    from dpagg_core.training.ti import train_vectors

    pipe, backend, jdg, init1, _, dim = load_model()
    cfg_over = VARIANTS[a.variant]
    v = cfg_over["vectors"]
    f = np.load(CACHE / f"{a.variant}_p{a.per_style}_n50.npz")
    public = f["public"]
    rows = public.reshape(-1, v * dim)
    centre_init = np.tile(init1[:dim], v)
    pe = PublicEmbeddings(
        vectors={"emb_params": torch.from_numpy(rows.reshape(-1, v, dim)).float()},
        model_family="sd1",
        base_model_id=backend.base_model_id or "",
        centre={"emb_params": torch.from_numpy(centre_init.reshape(v, dim)).float()},
        initializer=artifact.TI_INITIALIZER,
    )
    basis = basis_from_public_embeddings(pe, a.k)
    cen = rows.mean(0)
    c = float(np.median(np.linalg.norm(basis.project(rows - cen), axis=1)))
    prior = postprocess.WienerPrior.from_style_means(
        list(public), basis=basis, centre=cen, clip_norm=c
    )
    target = float(
        np.median([np.linalg.norm(p.mean(0).reshape(v, dim), axis=1).mean() for p in public])
    )
    layout = [("emb_params", v, dim)]
    method = f"dpagg_sub_pm_{a.variant}_k{a.k}_{a.postprocess}"

    def accuracy(flat: np.ndarray, style: str, seed: int) -> float:
        vec = torch.from_numpy(np.asarray(flat, dtype=np.float32).reshape(v, dim))
        imgs = sample.generate(
            pipe, vectors=vec, per_template=6, steps=20, guidance=3.0, seed=1000 + seed
        )
        return float(judge.style_accuracy(jdg, imgs, style))

    a.out.parent.mkdir(parents=True, exist_ok=True)
    for style in a.styles:
        for seed in a.seeds:
            for n in a.ns:
                t0 = time.time()
                ex = data.style_examples(style, n, offset=data.PRIVATE_OFFSET + 1000 * seed)
                cfg = artifact.ti_config(learning_rate=1e-2, seed=seed, **cfg_over)
                vec, _ = train_vectors(backend, data.to_tensor([e.image for e in ex]), cfg)
                emb = vec["emb_params"].double().flatten(1).numpy()
                tag = {"style": style, "n": n, "seed": seed, "delta": 1e-5, "variant": a.variant}
                out = [tag | {"method": f"mean_{a.variant}", "epsilon": None,
                              "acc": accuracy(emb.mean(0), style, seed)}]  # fmt: skip
                for eps in a.epsilons:
                    plan = calibration.calibrate(eps, 1e-5, n, "full")
                    accs = []
                    for _ in range(a.draws):
                        rel = dp_mean_projected(
                            emb, plan=plan, clip_norm=c, basis=basis, center=cen,
                            centre_kind="public_mean", base_model_id=basis.base_model_id,
                        )  # fmt: skip
                        vec_pp, _ = postprocess.apply(
                            rel.vector, method=a.postprocess, record=rel.record, layout=layout,
                            centre=cen, target_norms={"emb_params": target}, prior=prior,
                        )  # fmt: skip
                        accs.append(accuracy(vec_pp, style, seed))
                    out.append(tag | {"method": method, "epsilon": eps, "k": a.k, "K": basis.dim,
                                      "clip_norm": c, "sigma": plan.noise_std(c),
                                      "acc": float(np.mean(accs)), "acc_draws": accs})  # fmt: skip
                with a.out.open("a") as fh:
                    for r in out:
                        fh.write(json.dumps(r) + "\n")
                _log(f"{style} n={n} seed={seed}: {[r['acc'] for r in out]} "
                     f"({time.time() - t0:.0f}s)")  # fmt: skip


def ceiling(a: argparse.Namespace) -> None:
    """Non-private ceiling per PUBLIC training style: the judge's accuracy of the mean of its
    ``--per-style`` cached public embeddings, per variant (all 26 styles; public data only)."""
    from bench.minimodel import judge, sample
    from bench.reproduce_paper import load_model

    pipe, _, jdg, _, _, dim = load_model()
    res: dict[str, dict[str, float]] = {}
    for variant in a.variants:
        f = np.load(CACHE / f"{variant}_p{a.per_style}_n50.npz")
        v = VARIANTS[variant]["vectors"]
        res[variant] = {}
        for style, rows in zip([str(x) for x in f["styles"]], f["public"], strict=True):
            vec = torch.from_numpy(rows.mean(0).astype(np.float32).reshape(v, dim))
            imgs = sample.generate(pipe, vectors=vec, per_template=6, steps=20, guidance=3.0,
                                   seed=1000)  # fmt: skip
            res[variant][style] = float(judge.style_accuracy(jdg, imgs, style))
        _log(f"{variant}: mean {np.mean(list(res[variant].values())):.3f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")


def public_rho(variant: str, k: int, per_style: int = 6) -> tuple[float, int]:
    """(median rho over the 26 PUBLIC training styles, K) in the basis of all 26 (as ``heldout``
    releases in): the forecast's agreement for this recipe, from public data only."""
    from dpagg_core.aggregate.basis_builders import basis_from_public_embeddings
    from dpagg_core.aggregate.subspace import PublicEmbeddings

    public = np.load(CACHE / f"{variant}_p{per_style}_n50.npz")["public"]
    v = VARIANTS[variant]["vectors"]
    rows = public.reshape(-1, public.shape[-1])
    dim = rows.shape[1] // v
    pe = PublicEmbeddings(
        vectors={"emb_params": torch.from_numpy(rows.reshape(-1, v, dim)).float()},
        model_family="sd1",
        base_model_id="",
        centre={"emb_params": torch.zeros(v, dim)},
        initializer=artifact.TI_INITIALIZER,
    )
    basis = basis_from_public_embeddings(pe, k)
    cen = rows.mean(0)
    c = float(np.median(np.linalg.norm(basis.project(rows - cen), axis=1)))
    rhos = []
    for p in public:
        ys = basis.project(p - cen)
        rhos.append(
            unbiased_rho(ys * np.minimum(1.0, c / np.linalg.norm(ys, axis=1, keepdims=True)) / c)
        )
    return float(np.median(rhos)), int(basis.dim)


def _heldout_cells(path: Path, v3: Path) -> tuple:
    """``heldout`` rows grouped as ``heldout_table`` and ``plot_heldout`` read them: (method,
    variant, k, non-private accuracies per (n, row name), release accuracies per (n, epsilon)
    and style (one per seed, each the mean of its draws), the best non-private mean per n)."""
    from collections import defaultdict

    rows = [json.loads(x) for x in path.read_text().splitlines()]
    old = [json.loads(x) for x in v3.read_text().splitlines()]
    np_acc: dict[tuple[int, str], list[float]] = defaultdict(list)
    for r in old:
        if r["method"] in ("mean", "ti_shared"):
            np_acc[(r["n"], r["method"] + " (v3, 2 vectors)")].append(r["acc"])
    cell: dict[tuple[int, float], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    method = variant = k = None
    for r in rows:
        if r["epsilon"] is None:
            np_acc[(r["n"], r["method"])].append(r["acc"])
        else:
            method, variant, k = r["method"], r["variant"], r["k"]
            cell[(r["n"], r["epsilon"])][r["style"]].append(r["acc"])
    best = {n: max(float(np.mean(a)) for (m, a) in [(m, a) for (nn, m), a in np_acc.items()
                                                     if nn == n]) for n, _ in cell}  # fmt: skip
    return method, variant, k, np_acc, cell, best


def heldout_table(path: Path, v3: Path) -> str:
    """The held-out grid of ``heldout`` rows: style accuracy (mean ± std over styles x seeds, each
    the mean of its draws), between-style spread, share of the BEST non-private row at that n
    (``mean``/``ti_shared`` of ``v3`` or this recipe's own non-private mean), and the plan
    forecast's verdict (public rho of this recipe, its K) against the measured one (>= 75 %
    clear, 25-75 % weak, below noise: ``bench/forecast_check.py``'s bins)."""
    from dpagg_core.privacy import calibration
    from dpagg_core.privacy.forecast import verdict_of

    method, variant, k, np_acc, cell, best = _heldout_cells(path, v3)
    if method is None:
        return "no held-out rows yet\n"
    rho, kk = public_rho(variant, k)
    out = [
        f"Held-out grid of `{method}` (4 held-out styles x seeds, 2 noise draws per release; "
        f"forecast rho = {rho:.3f} from the 26 public training styles, K = {kk}):",
        "",
        "| n | non-private rows (mean over styles x seeds) | best |",
        "|---|---|---|",
    ]
    for n in sorted({n for n, _ in cell}):
        parts = ", ".join(
            f"{m} {np.mean(a):.3f} ({len(a)})" for (nn, m), a in sorted(np_acc.items()) if nn == n
        )
        out.append(f"| {n} | {parts} | {best[n]:.3f} |")
    out += [
        "",
        "| n | epsilon | cells | accuracy | between-style std | share of best non-private | "
        "forecast SNR | forecast | measured | agree |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    agree = total = 0
    for (n, eps), by_style in sorted(cell.items()):
        accs = [a for v_ in by_style.values() for a in v_]
        share = float(np.mean(accs)) / best[n]
        z = calibration.calibrate(eps, 1e-5, n, "full").noise_multiplier
        snr = rho * n / (2 * z * np.sqrt(kk))
        fc = verdict_of(snr)
        ms = "clear" if share >= 0.75 else "weak" if share >= 0.25 else "noise"
        agree += fc == ms
        total += 1
        style_means = [float(np.mean(v_)) for v_ in by_style.values()]
        out.append(
            f"| {n} | {eps:g} | {len(accs)} | {np.mean(accs):.3f} ± {np.std(accs):.3f} | "
            f"{np.std(style_means):.3f} | {share:.0%} | {snr:.2f} | {fc} | {ms} | "
            f"{'yes' if fc == ms else 'no'} |"
        )
    out += ["", f"Forecast agrees with the measured verdict in {agree}/{total} cells."]
    return "\n".join(out) + "\n"


# issue 21's targets on the held-out grid: (n, epsilon) -> share of the best non-private row
TARGETS = {(50, 2.0): 0.8, (200, 1.0): 0.9, (25, 4.0): 0.5}
PLOT_COLOURS = {10: (214, 39, 40), 25: (255, 127, 14), 50: (31, 119, 180), 200: (44, 160, 44)}


def _choice_shares(choice: Path, method: str) -> dict[tuple[int, float], tuple[str, str]]:
    """(n, epsilon) -> (accuracy "mean ± std", share "NN%") as ``choice.md`` prints them in the
    held-out table of ``method`` (the first table after its "Held-out grid of `method`" line)."""
    lines = choice.read_text().splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith(f"Held-out grid of `{method}`"))
    out: dict[tuple[int, float], tuple[str, str]] = {}
    for x in lines[start + 1 :]:
        if x.startswith("Forecast agrees"):
            break
        cells = [c.strip() for c in x.strip("|").split("|")]
        if len(cells) == 10 and cells[0].isdigit():
            out[(int(cells[0]), float(cells[1]))] = (cells[3], cells[5])
    return out


def heldout_shares(path: Path, v3: Path) -> tuple[str, dict[tuple[int, float], dict]]:
    """Per (n, epsilon) of a ``heldout`` grid: the share of the best non-private row at that n
    (mean over styles x seeds / best, exactly as ``heldout_table``), its std over the same cells
    (styles x seeds, each the mean of its draws) / best, and the between-style std / best."""
    method, _, _, _, cell, best = _heldout_cells(path, v3)
    res = {}
    for (n, eps), by_style in sorted(cell.items()):
        accs = [a for v_ in by_style.values() for a in v_]
        res[(n, eps)] = {
            "acc": float(np.mean(accs)),
            "acc_std": float(np.std(accs)),
            "best": best[n],
            "share": float(np.mean(accs)) / best[n],
            "share_std": float(np.std(accs)) / best[n],
            "between_style_std": float(np.std([np.mean(v_) for v_ in by_style.values()])) / best[n],
            "cells": len(accs),
        }
    return method, res


def plot_heldout(path: Path, v3: Path, png: Path, choice: Path | None = None) -> Path:
    """``png``: share of the best non-private row at that n vs epsilon (log x) for the held-out
    grid in ``path``, one line per n, bars = ± std over styles x seeds (the "±" of
    ``heldout_table``) / best; dashed marks: issue 21's targets (:data:`TARGETS`). With
    ``choice``, asserts the plotted numbers are the ones its table prints. Pillow, no training."""
    from PIL import Image, ImageDraw, ImageFont

    method, res = heldout_shares(path, v3)
    if choice is not None:
        printed = _choice_shares(choice, method)
        assert set(printed) == set(res), (sorted(printed), sorted(res))
        for key, r in res.items():
            got = (f"{r['acc']:.3f} ± {r['acc_std']:.3f}", f"{r['share']:.0%}")
            assert got == printed[key], (key, got, printed[key])
    ns = sorted({n for n, _ in res})
    eps = sorted({e for _, e in res})
    font, small, big = (ImageFont.load_default(size=s_) for s_ in (17, 15, 20))
    W, H = 1000, 700
    x0, y0, x1, y1 = 90, 80, 760, 610
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    lo, hi = np.log(eps[0] / 1.35), np.log(eps[-1] * 1.35)
    y_hi = max(1.0, max(r["share"] + r["share_std"] for r in res.values()))
    y_hi = float(np.ceil(y_hi * 10) / 10)

    def X(e: float) -> float:
        return x0 + (np.log(e) - lo) / (hi - lo) * (x1 - x0)

    def Y(v: float) -> float:
        return y1 - v / y_hi * (y1 - y0)

    d.text((W / 2, 18), f"Held-out grid, {method}", font=big, fill="black", anchor="mt")
    d.text((W / 2, 46), "(recommended recipe: 2 vectors + flips, k = 16; bench/results_v4)",
           font=small, fill="black", anchor="mt")  # fmt: skip
    for k in range(int(round(y_hi * 10)) + 1):
        v = k / 10
        if k % 2 == 0 or y_hi <= 0.6:
            d.line([x0, Y(v), x1, Y(v)], fill=(225, 225, 225))
            d.text((x0 - 8, Y(v)), f"{v:.0%}", font=font, fill="black", anchor="rm")
    for e in eps:
        d.line([X(e), y0, X(e), y1], fill=(240, 240, 240))
        d.line([X(e), y1, X(e), y1 + 6], fill="black")
        d.text((X(e), y1 + 10), f"{e:g}", font=font, fill="black", anchor="mt")
    d.rectangle([x0, y0, x1, y1], outline="black")
    d.text(((x0 + x1) / 2, y1 + 38), "epsilon (log scale), delta = 1e-5", font=font,
           fill="black", anchor="mt")  # fmt: skip
    ylab = Image.new("RGBA", (420, 24), (255, 255, 255, 0))
    ImageDraw.Draw(ylab).text((210, 12), "share of the best non-private row at that n",
                              font=font, fill="black", anchor="mm")  # fmt: skip
    ylab = ylab.rotate(90, expand=True)
    img.paste(ylab, (14, int((y0 + y1) / 2 - ylab.height / 2)), ylab)

    # lines, dodged a little along x so the bars do not overlap
    def dodge(n: int) -> float:
        return (ns.index(n) - (len(ns) - 1) / 2) * 7

    # issue 21's targets: a dashed mark at the target level over that cell, in that n's colour,
    # and a hollow diamond at the target itself (labelled in the legend, not over the data)
    for (n, e), t in TARGETS.items():
        if (n, e) not in res:
            continue
        col = PLOT_COLOURS.get(n, (0, 0, 0))
        for xs in range(int(X(e) - 40), int(X(e) + 40), 10):
            d.line([xs, Y(t), xs + 6, Y(t)], fill=col, width=3)
        x, y = X(e) + dodge(n), Y(t)
        d.polygon([(x, y - 9), (x + 9, y), (x, y + 9), (x - 9, y)], outline=col, fill="white",
                  width=3)  # fmt: skip
    for n in ns:
        col = PLOT_COLOURS.get(n, (0, 0, 0))
        dx = dodge(n)
        at = [e for e in eps if (n, e) in res]
        pts = [(X(e) + dx, Y(res[(n, e)]["share"])) for e in at]
        for e, (x, _) in zip(at, pts, strict=True):
            r = res[(n, e)]
            ya, yb = Y(max(r["share"] - r["share_std"], 0.0)), Y(r["share"] + r["share_std"])
            d.line([x, ya, x, yb], fill=col, width=2)
            d.line([x - 4, ya, x + 4, ya], fill=col, width=2)
            d.line([x - 4, yb, x + 4, yb], fill=col, width=2)
        d.line(pts, fill=col, width=3)
        for x, y in pts:
            d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=col)
    lx, ly = x1 + 25, y0
    d.text((lx, ly), "n (best non-private)", font=font, fill="black")
    for j, n in enumerate(ns):
        col = PLOT_COLOURS.get(n, (0, 0, 0))
        yy = ly + 32 + 28 * j
        d.line([lx, yy, lx + 30, yy], fill=col, width=3)
        d.ellipse([lx + 10, yy - 5, lx + 20, yy + 5], fill=col)
        d.text((lx + 40, yy), f"n = {n} ({res[(n, eps[0])]['best']:.3f})", font=font,
               fill="black", anchor="lm")  # fmt: skip
    notes = [
        "points: mean accuracy over",
        "4 held-out styles x 2 seeds",
        "(each the mean of 2 noise",
        "draws) / the best non-private",
        "row at that n (choice.md)",
        "",
        "bars: ± std over the same",
        "8 styles x seeds cells / best",
        "",
        "dashed + diamond: issue 21",
        "targets (measured):",
    ]
    ty = ly + 32 + 28 * len(ns) + 20
    for j, t in enumerate(notes):
        d.text((lx, ty + 22 * j), t, font=small, fill=(60, 60, 60))
    ty += 22 * len(notes) + 4
    for (n, e), t in TARGETS.items():
        if (n, e) in res:
            d.text((lx, ty), f"({n}, {e:g}) >= {t:.0%}: {res[(n, e)]['share']:.0%}", font=font,
                   fill=PLOT_COLOURS.get(n, (0, 0, 0)))  # fmt: skip
            ty += 26
    png.parent.mkdir(parents=True, exist_ok=True)
    img.save(png)
    return png


def summarize(path: Path) -> str:
    """The markdown tables of ``analyze``'s rows (the last row per variant and k wins)."""
    rows: dict[tuple[str, int], dict] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        rows[(r["variant"], r["k_per_vector"])] = r
    out = [
        "| variant | vectors | flip | steps | k/vector | K | C | rho (fit styles: median, "
        "min-max) | rho (validation, n) | SNR fit | SNR val | cos(projected) val |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (variant, k), r in rows.items():
        out.append(
            f"| {variant} | {r['vectors']} | {r['flip']} | {r['steps']} | {k} | {r['K']} | "
            f"{r['C']:.3g} | {r['rho_fit_median']:.3f} ({r['rho_fit_min']:.2f}-"
            f"{r['rho_fit_max']:.2f}) | {np.median(r['rho_val']):.3f} | "
            f"{r['snr_fit_median']:.2f} | {r['snr_val_median']:.2f} | "
            f"{np.mean(r.get('cos_projected_val', [np.nan])):.3f} |"
        )
    acc_rows = [r for r in rows.values() if "acc_release" in r]
    if acc_rows:
        best_np = max(float(np.mean(r["acc_nonprivate"])) for r in acc_rows)
        methods = [m for m in POSTPROCESS if any(m in r["acc_release"] for r in acc_rows)]
        out += [
            "",
            f"Judge's style accuracy on the 4 public validation styles (n = {acc_rows[0]['n']}, "
            f"epsilon = {acc_rows[0]['epsilon']}, delta 1e-5, subspace + public-mean centre; "
            "mean ± std over styles x draws, [between-style std of the per-style means], "
            f"share = mean / the best non-private row ({best_np:.3f})):",
            "",
            "| variant | k | draws | non-private | projected | " + " | ".join(methods) + " |",
            "|---|---|---|---|---|" + "---|" * len(methods),
        ]
        for r in acc_rows:
            cells = []
            for m in methods:
                if m not in r["acc_release"]:
                    cells.append("-")
                    continue
                per_style = np.array(r["acc_release"][m])
                mu = float(per_style.mean())
                cells.append(
                    f"{mu:.3f} ± {per_style.std():.2f} [{per_style.mean(1).std():.2f}] "
                    f"({mu / best_np:.0%})"
                )
            out.append(
                f"| {r['variant']} | {r['k_per_vector']} | {r['draws']} | "
                f"{np.mean(r['acc_nonprivate']):.3f} | {np.mean(r['acc_projected']):.3f} | "
                + " | ".join(cells)
                + " |"
            )
        out += [
            "",
            "Cosine of the released delta with the non-private delta (mean over styles x draws):",
            "",
            "| variant | k | " + " | ".join(methods) + " |",
            "|---|---|" + "---|" * len(methods),
        ]
        for r in acc_rows:
            out.append(
                f"| {r['variant']} | {r['k_per_vector']} | "
                + " | ".join(
                    f"{r['cos_release'][m]:.3f}" if m in r["cos_release"] else "-" for m in methods
                )
                + " |"
            )
    return "\n".join(out) + "\n"


def plot_results_v4(results: Path = ROOT / "bench" / "results_v4") -> Path:
    """``results/utility_vs_epsilon.png`` from the held-out rows of the recipe recommended in
    ``results/settings.json`` (``heldout_v2_flip.jsonl``), checked against ``choice.md``."""
    rec = json.loads((results / "settings.json").read_text())["recommended"]
    variant = rec.removeprefix("dpagg_sub_pm_").rsplit("_k", 1)[0]
    rows = results / f"heldout_{variant}.jsonl"
    v3 = ROOT / "bench" / "results_v3" / "results.jsonl"
    method, res = heldout_shares(rows, v3)
    assert method.startswith(rec + "_"), (method, rec)
    png = plot_heldout(
        rows,
        v3,
        results / "utility_vs_epsilon.png",
        choice=results / "choice.md",
    )
    for (n, e), t in TARGETS.items():
        r = res[(n, e)]
        _log(f"({n}, {e:g}): share {r['share']:.3f} ± {r['share_std']:.3f} (target {t:.0%})")
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--plot-only",
        action="store_true",
        help="only redraw bench/results_v4/utility_vs_epsilon.png from the recommended "
        "recipe's held-out rows (settings.json), checked against choice.md; no training",
    )
    sub = ap.add_subparsers(dest="cmd")
    e = sub.add_parser("embed")
    e.add_argument("--variant", choices=list(VARIANTS), required=True)
    z = sub.add_parser("analyze")
    z.add_argument("--variants", nargs="+", default=["v2", "v1"])
    z.add_argument("--ks", type=int, nargs="+", default=[8, 16])
    z.add_argument("--epsilon", type=float, default=2.0)
    z.add_argument("--draws", type=int, default=4)
    z.add_argument("--accuracy", action="store_true")
    z.add_argument("--postprocess", nargs="+", default=list(POSTPROCESS))
    z.add_argument("--out", type=Path, default=ROOT / "bench" / "results_v4" / "more_signal.jsonl")
    h = sub.add_parser("heldout")
    h.add_argument("--variant", choices=list(VARIANTS), required=True)
    h.add_argument("--k", type=int, required=True)
    h.add_argument("--postprocess", default="none")
    h.add_argument("--styles", nargs="+", default=list(data.HELD_OUT))
    h.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    h.add_argument("--ns", type=int, nargs="+", default=[10, 25, 50, 200])
    h.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0])
    h.add_argument("--draws", type=int, default=2)
    h.add_argument("--out", type=Path, default=ROOT / "bench" / "results_v4" / "heldout.jsonl")
    ce = sub.add_parser("ceiling")
    ce.add_argument("--variants", nargs="+", default=["v2", "v1", "v1_flip"])
    ce.add_argument("--out", type=Path, default=ROOT / "bench" / "results_v4" / "ceiling.json")
    ht = sub.add_parser("heldout-table")
    ht.add_argument("--out", type=Path, default=ROOT / "bench" / "results_v4" / "heldout.jsonl")
    ht.add_argument("--v3", type=Path, default=ROOT / "bench" / "results_v3" / "results.jsonl")
    sm = sub.add_parser("summarize")
    sm.add_argument("--out", type=Path, default=ROOT / "bench" / "results_v4" / "more_signal.jsonl")
    for p in (e, z, sm, h, ht, ce):
        p.add_argument("--per-style", type=int, default=6)
        p.add_argument("--n", type=int, default=50)
        p.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    if a.plot_only:
        t0 = time.time()
        png = plot_results_v4()
        _log(f"wrote {png} ({time.time() - t0:.1f}s)")
        return 0
    if a.cmd is None:
        ap.error("a command (embed, analyze, heldout, ...) or --plot-only is required")
    torch.set_num_threads(a.threads)
    if a.cmd == "embed":
        embed(a.variant, a.per_style, a.n)
    elif a.cmd == "heldout":
        heldout(a)
    elif a.cmd == "ceiling":
        ceiling(a)
    elif a.cmd == "heldout-table":
        print(heldout_table(a.out, a.v3), end="")
    elif a.cmd == "summarize":
        print(summarize(a.out), end="")
    else:
        analyze(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
