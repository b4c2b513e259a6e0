"""The non-private reference of the DP-SGD baseline (epsilon = infinity), for benchmarks only.

Not part of the package: it trains ONE shared embedding on all images with no clipping and no
noise, so its output is never released. ``bench/reproduce_paper.py`` and
``bench/minimodel/tune.py`` compare against it; ``tests/test_dpsgd.py`` checks it is DP-SGD's
own loop minus the privacy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpagg_core.training.dpsgd import DPSGDConfig, _apply, _clipped_sum, _setup, validate_config
from dpagg_core.training.ti import TIBackend, check_images


def train_shared_nonprivate(
    backend: TIBackend,
    images: torch.Tensor,
    config: DPSGDConfig,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """ONE shared embedding trained on all images with the same loop, batches and optimizer as
    ``dpsgd.train_dpsgd`` but without clipping or noise; the step uses the batch's mean gradient.
    Batches are Poisson samples at rate ``expected_batch / N`` from a generator seeded by
    ``config.seed``. NOT private: for benchmarks only, never released. Returns ``[v, dim]``
    float32 per key."""
    check_images(images)
    n = int(images.shape[0])
    validate_config(config, n)
    q = config.sampling_rate(n)
    st = _setup(backend, images, config)
    gen = torch.Generator().manual_seed(int(config.seed))
    for step in range(config.steps):
        batch = torch.nonzero(torch.rand(n, generator=gen) < q).flatten().tolist()
        if not batch:
            continue
        summed = _clipped_sum(backend, st, config, batch, step, None)
        _apply(st, {k: g / len(batch) for k, g in summed.items()})
        if progress is not None:
            progress(step + 1, config.steps)
    return st.result()
