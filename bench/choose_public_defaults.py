"""Choose the public-subspace settings of the comparison on PUBLIC training styles only.

    .venv/bin/python bench/choose_public_defaults.py        # ~10 min on 2 CPU cores

Issue 10 part 4: every default (basis, k, centre, C, shrinkage) is chosen without the held-out
styles. This script uses only the mini model's 26 *training* styles (``data.TRAIN_STYLES``):

1. Per-image TI embeddings of ``--per-style`` public images of every training style.
2. Four of those styles are set aside for validation (fixed by index, below); the basis is the
   per-vector PCA (``PublicBasis.from_public_embeddings``) of the other 22 styles' embeddings.
   For k in ``--ks``: the cosine between a validation style's mean embedding (around the
   initializer) and its projection, and the judge's style accuracy of both. Rule (the one of
   ``subspace.choose_k`` / ``dpagg public-basis --k auto``): the smallest k whose mean validation
   cosine is >= ``--min-cos`` (the worst is recorded too).
3. A private-like dry run on the validation styles (``--n`` images each, images disjoint from step
   1): DPAgg-TI with all D coordinates vs the chosen subspace, each around the initializer and
   around the public mean embedding (``public_mean_centre`` of the 22 fitting styles), with and
   without James-Stein, at ``--epsilon`` (delta 1e-5), ``--draws`` noise draws each. C is the
   median public delta norm (in the subspace for the projected rows), as everywhere.

Writes ``--out`` (default ``bench/results_v2/public_defaults.json``) with every figure and the
choice; ``bench/reproduce_paper.py`` uses the chosen k (``--basis-k``) and reads this file's
record only as documentation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dpagg_core.aggregate.basis_builders import basis_from_public_embeddings

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.minimodel import artifact, data, judge, sample  # noqa: E402

VALIDATION_INDICES = (0, 7, 14, 21)  # of data.TRAIN_STYLES: one style per few palettes


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    from dpagg_core.aggregate import postprocess
    from dpagg_core.aggregate.subspace import (
        PublicEmbeddings,
        dp_mean_projected,
        public_mean_centre,
    )
    from dpagg_core.privacy import calibration, mechanism
    from dpagg_core.training.ti import train_vectors

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-style", type=int, default=6)
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 12, 16, 20, 24, 32])
    ap.add_argument("--min-cos", type=float, default=0.95)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--epsilon", type=float, default=2.0)
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results_v2" / "public_defaults.json"
    )
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()

    from bench.reproduce_paper import load_model

    pipe, backend, jdg, centre, v, dim = load_model()

    def ti(style: str, n: int, offset: int) -> np.ndarray:
        imgs = data.to_tensor([e.image for e in data.style_examples(style, n, offset=offset)])
        vec, _ = train_vectors(backend, imgs, artifact.ti_config(steps=150, learning_rate=1e-2))
        return vec["emb_params"].double().flatten(1).numpy()

    def accuracy(flat: np.ndarray, style: str, seed: int = 0) -> float:
        vec = torch.from_numpy(np.asarray(flat, dtype=np.float32).reshape(v, dim))
        imgs = sample.generate(
            pipe, vectors=vec, per_template=6, steps=20, guidance=3.0, seed=1000 + seed
        )
        return float(judge.style_accuracy(jdg, imgs, style))

    train = list(data.TRAIN_STYLES)
    val = [train[i] for i in VALIDATION_INDICES]
    fit = [s for s in train if s not in val]
    emb = {s: ti(s, a.per_style, data.REFERENCE_OFFSET) for s in train}
    _log(f"public TI: {len(train)} styles x {a.per_style} images ({time.time() - t0:.0f}s)")

    def public_set(styles: list[str]) -> PublicEmbeddings:
        rows = np.concatenate([emb[s] for s in styles])
        return PublicEmbeddings(
            vectors={"emb_params": torch.from_numpy(rows.reshape(-1, v, dim)).float()},
            model_family="sd1",
            base_model_id=backend.base_model_id or "",
            centre={"emb_params": torch.from_numpy(centre.reshape(v, dim)).float()},
            initializer=artifact.TI_INITIALIZER,
        )

    public_fit = public_set(fit)
    sweep = []
    for k in a.ks:
        basis = basis_from_public_embeddings(public_fit, k)
        cos, acc_p, acc_m = [], [], []
        for s in val:
            dm = emb[s].mean(0) - centre
            p = basis.lift(basis.project(dm))
            cos.append(float(dm @ p / (np.linalg.norm(dm) * np.linalg.norm(p))))
            acc_p.append(accuracy(centre + p, s))
            acc_m.append(accuracy(centre + dm, s))
        row = {
            "k": k,
            "cos_mean": float(np.mean(cos)),
            "cos_min": float(np.min(cos)),
            "acc_projected": float(np.mean(acc_p)),
            "acc_mean": float(np.mean(acc_m)),
        }
        sweep.append(row)
        _log(f"k={k}: " + ", ".join(f"{key} {val_:.3f}" for key, val_ in row.items() if key != "k"))
    chosen = [r["k"] for r in sweep if r["cos_mean"] >= a.min_cos]
    k_star = min(chosen) if chosen else max(a.ks)
    _log(f"chosen k = {k_star} per vector (smallest with mean validation cosine >= {a.min_cos})")

    basis = basis_from_public_embeddings(public_fit, k_star)
    centres = {
        "initializer": centre,
        "public_mean": public_mean_centre(public_fit).flat(),
    }
    fit_rows = np.concatenate([emb[s] for s in fit])
    plan = calibration.calibrate(a.epsilon, 1e-5, a.n, "full")
    layout = [("emb_params", v, dim)]
    private_like = {s: ti(s, a.n, data.REFERENCE_OFFSET + 500) for s in val}
    _log(f"validation sets: {len(val)} styles x {a.n} images ({time.time() - t0:.0f}s)")
    dry = []
    for centre_kind, cen in centres.items():
        c_full = float(np.median(np.linalg.norm(fit_rows - cen, axis=1)))
        c_sub = float(np.median(np.linalg.norm(basis.project(fit_rows - cen), axis=1)))
        for space, c in (("full", c_full), ("subspace", c_sub)):
            for js in (False, True):
                accs = []
                for s in val:
                    for draw in range(a.draws):
                        x = private_like[s]
                        if space == "full":
                            rel = mechanism.dp_mean(
                                x, plan=plan, clip_norm=c, center=cen, centre_kind=centre_kind
                            )
                        else:
                            rel = dp_mean_projected(
                                x, plan=plan, clip_norm=c, basis=basis, center=cen,
                                centre_kind=centre_kind, base_model_id=basis.base_model_id,
                            )  # fmt: skip
                        vec = rel.vector
                        if js:
                            vec, _ = postprocess.apply(
                                vec, method="js", record=rel.record, layout=layout, centre=cen
                            )
                        accs.append(accuracy(vec, s, seed=draw))
                row = {
                    "centre": centre_kind,
                    "space": space,
                    "js": js,
                    "clip_norm": c,
                    "acc": float(np.mean(accs)),
                    "acc_std": float(np.std(accs)),
                }
                dry.append(row)
                _log(f"dry run {row}")
    non_private = float(np.mean([accuracy(private_like[s].mean(0), s) for s in val]))
    best = max(dry, key=lambda r: r["acc"])
    _log(f"non-private mean on the validation sets: {non_private:.3f}; best: {best}")
    out = {
        "validation_styles": val,
        "fitting_styles": fit,
        "per_style": a.per_style,
        "min_cos": a.min_cos,
        "k_sweep": sweep,
        "chosen_k": k_star,
        "dry_run": {"n": a.n, "epsilon": a.epsilon, "delta": 1e-5, "draws": a.draws, "rows": dry},
        "non_private_mean_acc": non_private,
        "best": best,
        "seconds": round(time.time() - t0),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    _log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
