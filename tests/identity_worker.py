"""Worker for test_identity's concurrency test, in a module of its own that imports no torch.

The test's workers are fresh processes (as torchrun ranks, or ComfyUI beside the CLI, are), forked
by a ``forkserver`` that has imported the ledger. Each imports the module its target lives in: from
test_identity (torch, safetensors, the io modules) that cost seconds per worker on 2 cores.
"""

from __future__ import annotations

from dpagg_core.privacy.ledger import identity_key


def key_worker(path: str, barrier, queue) -> None:
    """Wait for all workers, then open the (fresh) ledger and report its key, or the error."""
    barrier.wait()
    try:
        queue.put(identity_key(path).hex())
    except Exception as exc:  # reported to the parent
        queue.put(f"error: {exc}")
