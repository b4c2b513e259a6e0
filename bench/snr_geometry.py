"""Why a mean-based release needs dozens of images: its signal-to-noise ratio, from PUBLIC data.

    .venv/bin/python bench/snr_geometry.py        # ~2 min on 2 CPU cores

For the setting ``bench/reproduce_paper.py`` calls ``dpagg_sub_pm`` (public basis, k = 16 per
vector, fitted to per-image embeddings of 6 PUBLIC images of each of the 26 training styles;
clipped around those embeddings' mean at their median distance C in the basis), the release is

    centre + U (mean_i clip_C(U^T (x_i - centre)) + N(0, (2 z C / n)^2 I_K)),

so its signal-to-noise ratio (norm of the expected clipped mean over norm of the noise) is

    SNR = rho n / (2 z sqrt(K)),   rho = || E[clip_C(y) / C] ||,

where rho (<= 1) measures how much the clipped per-image deltas of one style agree. rho is
estimated per training style from its 6 public embeddings with the unbiased estimator of a mean's
squared norm, ``(m |u_bar|^2 - mean |u_i|^2) / (m - 1)`` (the plain ``|u_bar|`` of 6 vectors is
biased upward by about 1/sqrt(6)). z comes from the library's calibration (full sampling,
delta 1e-5, replace-one). Public data only: no held-out style is read.

Measured (this script):

    K = 32 noised coordinates, C = 1.698; rho over 26 training styles: median 0.431 (min 0.221,
    max 0.618)
      n     eps=0.5    eps=1      eps=2      eps=4      eps=8
      10         0.05       0.10       0.19       0.35       0.63
      25         0.14       0.26       0.48       0.88       1.59
      50         0.27       0.51       0.96       1.76       3.17
      200        1.08       2.04       3.82       7.05      12.69

Read against ``bench/results_v3/table.md`` (``dpagg_sub_pm``, share of the non-private mean): about
75-85 % needs an SNR of about 2-3 ((50, 4): 1.76 -> 73 %; (50, 8): 3.17 -> 83 %; (200, 4): 7.05 ->
100 %), and below ~1 little is left ((50, 2): 0.96 -> 68 % with a large spread; (200, 0.5): 1.08 ->
43 %; (10, 4): 0.35 -> nothing usable).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from dpagg_core.aggregate.basis_builders import basis_from_public_embeddings

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.minimodel import artifact, data  # noqa: E402

PER_STYLE = 6
K_PER_VECTOR = 16


def main() -> int:
    from bench.reproduce_paper import load_model
    from dpagg_core.aggregate.subspace import PublicEmbeddings
    from dpagg_core.privacy.calibration import calibrate
    from dpagg_core.training.ti import train_vectors

    torch.set_num_threads(2)
    _, backend, _, centre, v, dim = load_model()
    emb = []
    for style in data.TRAIN_STYLES:
        imgs = data.to_tensor(
            [e.image for e in data.style_examples(style, PER_STYLE, offset=data.REFERENCE_OFFSET)]
        )
        vec, _ = train_vectors(backend, imgs, artifact.ti_config(steps=150, learning_rate=1e-2))
        emb.append(vec["emb_params"].double().flatten(1).numpy())
    rows = np.concatenate(emb)
    public = PublicEmbeddings(
        vectors={"emb_params": torch.from_numpy(rows.reshape(-1, v, dim)).float()},
        model_family="sd1",
        base_model_id=backend.base_model_id or "",
        centre={"emb_params": torch.from_numpy(centre.reshape(v, dim)).float()},
        initializer=artifact.TI_INITIALIZER,
    )
    basis = basis_from_public_embeddings(public, K_PER_VECTOR)
    y = basis.project(rows - rows.mean(0))
    c = float(np.median(np.linalg.norm(y, axis=1)))
    rhos = []
    for i in range(len(data.TRAIN_STYLES)):
        ys = y[i * PER_STYLE : (i + 1) * PER_STYLE]
        u = ys * np.minimum(1.0, c / np.linalg.norm(ys, axis=1, keepdims=True)) / c
        m = len(u)
        mu2 = (m * float(np.sum(u.mean(0) ** 2)) - float(np.mean(np.sum(u**2, axis=1)))) / (m - 1)
        rhos.append(float(np.sqrt(max(mu2, 0.0))))
    rho = float(np.median(rhos))
    print(
        f"K = {basis.dim} noised coordinates, C = {c:.4g}; rho over {len(rhos)} training styles: "
        f"median {rho:.3f} (min {min(rhos):.3f}, max {max(rhos):.3f})"
    )
    epsilons = (0.5, 1.0, 2.0, 4.0, 8.0)
    print("SNR = rho n / (2 z sqrt(K)):")
    print("  n   " + "".join(f"  eps={e:<5g}" for e in epsilons))
    for n in (10, 25, 50, 200):
        cells = []
        for e in epsilons:
            z = calibrate(e, 1e-5, n, "full").noise_multiplier
            cells.append(f"  {rho * n / (2 * z * np.sqrt(basis.dim)):9.2f}")
        print(f"  {n:<4d}" + "".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
