"""Scale-out of per-image TI over ``torchrun`` ranks (``torch.distributed``: gloo on CPU, nccl on
CUDA).

``torchrun --nproc-per-node K -m dpagg_core.cli train ...``: every rank loads the same image set,
trains a contiguous shard of it, and rank 0 gathers the rows in global order into one
``EmbeddingSet``. Only rank 0 may touch the ledger or write files (``is_main_process()``);
other ranks get ``None``.

Privacy: sharding changes nothing about what each row depends on. Image i is trained by exactly
one rank, with its generator keyed by its *global* index (``dpagg_core.training.ti.image_seed``), so
the gathered set equals the single-process one (up to floating-point summation order) and row i is
still a function of image i and public inputs only (docs/privacy.md invariant 1). The gathered
per-image embeddings stay in rank 0's memory; nothing private is written or logged here (invariant
4).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from dpagg_core.errors import DpaggError
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.training.ti import (
    Cancelled,
    TIBackend,
    TIConfig,
    check_images,
    public_centre,
    train_embeddings,
    train_vectors,
    validate_config,
)

log = logging.getLogger(__name__)


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: from the process group when one is initialised,
    else from torchrun's ``RANK`` / ``WORLD_SIZE`` (``(0, 1)`` outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on rank 0 (or outside torchrun): the only process that may use the ledger or write."""
    return world()[0] == 0


def shard_indices(n: int, world_size: int, rank: int) -> list[int]:
    """Global image indices of ``rank``: contiguous, balanced blocks (sizes differ by at most
    one), in order, so concatenating the shards by rank restores the original order."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DpaggError(f"rank={rank} / world_size={world_size}: need 0 <= rank < world_size")
    return list(range(rank * n // world_size, (rank + 1) * n // world_size))


def init_process_group(*, init_method: str | None = None) -> bool:
    """Initialise ``torch.distributed`` from torchrun's environment if not done yet: nccl when
    CUDA is available (one GPU per local rank), gloo otherwise. Returns True if it initialised
    the group here (the caller then destroys it)."""
    if dist.is_initialized():
        return False
    rank, size = world()
    if size <= 1:
        return False
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        init_method=init_method or "env://",
        rank=rank,
        world_size=size,
    )
    return True


def _local_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def train_distributed(
    backend: TIBackend | Callable[[torch.device], TIBackend],
    images: torch.Tensor,
    config: TIConfig,
    *,
    dataset_id: str = "",
    base_model_id: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> EmbeddingSet | None:
    """Per-image TI of ``images`` (the whole set, identical on every rank) sharded over ranks.

    ``backend`` is a ``TIBackend`` or a factory ``device -> TIBackend`` (called with this rank's
    device: ``cuda:<local rank>`` under nccl, ``cpu`` under gloo). A ``DiffusersBackend`` built
    for another CUDA device is moved to this rank's. Returns the gathered ``EmbeddingSet`` on rank
    0 and ``None`` on the others. ``progress`` reports rank 0's own shard. Outside a process
    group (single process) this is ``train_embeddings``.

    Failure handling: every rank takes part in one gather whatever happens, so a rank that fails
    or is cancelled never leaves the others hanging; rank 0 then raises (``Cancelled`` if any
    rank was cancelled, else ``DpaggError`` naming the rank) and returns nothing partial.
    """
    # Same inputs on every rank, so a bad input fails identically everywhere (no rank waits).
    check_images(images)
    validate_config(config)
    created = init_process_group()
    if not (dist.is_available() and dist.is_initialized()):
        if isinstance(backend, TIBackend):
            be = backend
        else:
            be = backend(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return train_embeddings(
            be,
            images,
            config,
            dataset_id=dataset_id,
            base_model_id=base_model_id,
            progress=progress,
            should_cancel=should_cancel,
        )
    try:
        return _train_sharded(
            backend,
            images,
            config,
            dataset_id=dataset_id,
            base_model_id=base_model_id,
            progress=progress,
            should_cancel=should_cancel,
        )
    finally:
        if created:
            dist.destroy_process_group()


def _train_sharded(
    backend: TIBackend | Callable[[torch.device], TIBackend],
    images: torch.Tensor,
    config: TIConfig,
    *,
    dataset_id: str,
    base_model_id: str | None,
    progress: Callable[[int, int], None] | None,
    should_cancel: Callable[[], bool] | None,
) -> EmbeddingSet | None:
    rank, size = dist.get_rank(), dist.get_world_size()
    device = _local_device()
    n = int(images.shape[0])
    indices = shard_indices(n, size, rank)
    payload: tuple
    error: BaseException | None = None
    be: TIBackend | None = None
    try:
        if isinstance(backend, TIBackend):
            be = backend
            if device.type == "cuda" and torch.device(be.device) != device:
                be.device = device  # DiffusersBackend.prepare() moves its models there
        else:
            be = backend(device)
        if indices:
            vectors, _ = train_vectors(
                be,
                images[indices],
                config,
                image_indices=indices,
                progress=progress if rank == 0 else None,
                should_cancel=should_cancel,
            )
            vectors = {k: t.to("cpu", torch.float32).contiguous() for k, t in vectors.items()}
        else:
            vectors = None
        payload = ("ok", indices, vectors)
    except Cancelled as e:
        error, payload = e, ("cancelled", str(e))
    except Exception as e:
        error, payload = e, ("error", f"{type(e).__name__}: {e}")

    gathered: list | None = [None] * size if rank == 0 else None
    if dist.get_backend() == "nccl":
        torch.cuda.set_device(device)
    dist.gather_object(payload, gathered, dst=0)
    # gloo's gather returns on a sender before the root has received: no rank leaves (and may
    # destroy its group) before the root holds every payload.
    dist.barrier()
    if rank != 0:
        if error is not None:
            raise error
        return None

    assert gathered is not None
    if error is not None:
        raise error
    cancelled = [r for r, p in enumerate(gathered) if p[0] == "cancelled"]
    if cancelled:
        raise Cancelled(f"textual inversion cancelled on rank(s) {cancelled}; nothing returned")
    failed = [(r, p[1]) for r, p in enumerate(gathered) if p[0] != "ok"]
    if failed:
        r, msg = failed[0]
        raise DpaggError(f"per-image TI failed on rank {r} of {size}: {msg}")
    assert be is not None
    order: list[int] = []
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in be.encoder_keys}
    for _, idx, vec in gathered:
        if not idx:
            continue
        order.extend(idx)
        for k in parts:
            parts[k].append(vec[k])
    if order != list(range(n)):
        raise DpaggError(f"gathered shards cover {len(order)} of {n} images out of order")
    return EmbeddingSet(
        vectors={k: torch.cat(v, 0) for k, v in parts.items()},
        kind="textual_inversion",
        model_family=be.model_family,
        base_model_id=be.base_model_id if base_model_id is None else base_model_id,
        centre=public_centre(be, config),
        initializer=config.initializer,
        dataset_id=dataset_id,
    )


__all__: Sequence[str] = (
    "init_process_group",
    "is_main_process",
    "shard_indices",
    "train_distributed",
    "world",
)
