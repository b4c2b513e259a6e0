"""Aggregate timings: the DP mean of 1000 x 768 embeddings, alone and through ledger + file.

Target (issue 2): aggregate of 1000 x 768 < 0.2 s. Prints medians of repeated runs, measured side
by side in one process, so the ratios are meaningful on a noisy machine.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dpagg_core.aggregate.release import release_embeddings, release_vectors
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.io.images import dataset_id_for
from dpagg_core.privacy.calibration import calibrate
from dpagg_core.privacy.ledger import Ledger
from dpagg_core.privacy.mechanism import dp_mean

N, DIM, REPEATS = 1000, 768, 7


def timed(fn) -> float:
    runs = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    rng = np.random.default_rng(0)
    centre = rng.normal(size=(1, DIM)).astype(np.float32)
    data = centre + 0.3 * rng.normal(size=(N, 1, DIM)).astype(np.float32)
    plan = calibrate(1.0, 1e-5, N, "full")
    plan_wor = calibrate(1.0, 1e-5, N, "wor", m=100)
    flat = data.reshape(N, DIM).astype(np.float64)

    t_mean = timed(lambda: dp_mean(flat, plan=plan, clip_norm=1.0))
    t_wor = timed(lambda: dp_mean(flat, plan=plan_wor, clip_norm=1.0))

    tmp = Path(tempfile.mkdtemp(prefix="dpagg-bench-"))
    ledger = Ledger(tmp / "ledger.sqlite")
    counter = iter(range(10_000))

    def through_ledger() -> None:
        i = next(counter)
        release_vectors(
            ledger,
            flat,
            dataset_id=f"bench-{i}",
            plan=plan,
            clip_norm=1.0,
            name="bench",
        )

    t_ledger = timed(through_ledger)

    eset = EmbeddingSet(
        vectors={"emb_params": torch.from_numpy(data)},
        kind="textual_inversion",
        model_family="sd1",
        base_model_id="bench",
        centre={"emb_params": torch.from_numpy(centre)},
        initializer="painting",
        dataset_id="x",
    )

    key = ledger.identity_key()

    def end_to_end() -> None:
        i = next(counter)
        object.__setattr__(eset, "dataset_id", dataset_id_for([str(i).encode()], key=key))
        release_embeddings(
            eset, plan=plan, clip_norm=1.0, name=f"b{i}", out_dir=tmp / "emb", ledger=ledger
        )

    t_full = timed(end_to_end)
    print(f"aggregate {N} x {DIM} (median of {REPEATS}):")
    print(f"  dp_mean, full sampling           {t_mean * 1e3:8.2f} ms")
    print(f"  dp_mean, wor m=100               {t_wor * 1e3:8.2f} ms")
    print(f"  ledger.release (SQLite, fsync)   {t_ledger * 1e3:8.2f} ms")
    print(f"  release_embeddings (+ file)      {t_full * 1e3:8.2f} ms")
    print(f"target < 200 ms: {'met' if max(t_mean, t_ledger, t_full) < 0.2 else 'MISSED'}")


if __name__ == "__main__":
    main()
