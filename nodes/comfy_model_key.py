"""The request key's model part for a release trained in ComfyUI: the MODEL, CLIP and VAE of the
graph AS PATCHED (:func:`model_key`), where the CLI hashes the checkpoint file
(``dpagg_core.pipeline.run_inputs``). Reads ComfyUI's ModelPatcher attributes only (no comfy
import, no model load), so it is also what the node tests exercise on patcher-like objects.

Why it matters (issue 19 item 2): an identical request is answered from the ledger without
training, so anything that shapes the trained embeddings must change the key (a LoRA and its
strength, an object patch, CLIP Set Last Layer), or a changed model would get a stale release;
and nothing else may (an identical graph after a restart must be the same request, or it would
be charged again). Public: hashes of weights the user loaded, no image data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from dpagg_core.privacy.identity import fingerprint

MODEL_KEY_SAMPLES = 64  # values hashed per base weight (evenly spaced; the shape in full)
PATCH_SAMPLES = 4096  # per patch tensor (a LoRA's up/down, a diff)
# CLIP weights an SD checkpoint may lack: ComfyUI then leaves them uninitialised (a new value at
# every load) and unused (it drops them from its own missing-keys warning, comfy/sd.py); hashing
# them would make every load a new model.
UNLOADED_KEYS = (".logit_scale", ".transformer.text_projection.weight")


def _sampled(tensors: Sequence[torch.Tensor], count: int, h: Any) -> list[torch.Tensor]:
    """``count`` evenly spaced values of each tensor (flattened; integer indices, exact for any
    size), each tensor's shape hashed into ``h``: what ``fingerprint`` then hashes."""
    out = []
    for t in tensors:
        h.update(repr(tuple(t.shape)).encode())
        flat = t.detach().reshape(-1)
        k = min(count, flat.numel())
        idx = torch.arange(k, dtype=torch.int64) * max(flat.numel() - 1, 0) // max(k - 1, 1)
        out.append(flat[idx.to(flat.device)])
    return out


def _describe(value: Any, h: Any, tensors: list[torch.Tensor]) -> None:
    """Feed a patch value into ``h`` (structure, numbers, names) and its tensors into
    ``tensors``: LoRA adapters (``.weights``), tuples, lists, dicts, tensors, numbers,
    functions (by qualified name)."""
    if isinstance(value, torch.Tensor):
        h.update(b"T")
        tensors.append(value)
    elif value is None or isinstance(value, (bool, int, float, str)):
        h.update(repr(value).encode())
    elif isinstance(value, (list, tuple)):
        h.update(f"[{len(value)}".encode())
        for v in value:
            _describe(v, h, tensors)
        h.update(b"]")
    elif isinstance(value, dict):
        h.update(f"{{{len(value)}".encode())
        for k in sorted(value, key=repr):
            h.update(repr(k).encode())
            _describe(value[k], h, tensors)
        h.update(b"}")
    else:
        kind = type(value)
        h.update(f"<{kind.__module__}.{getattr(kind, '__qualname__', kind.__name__)}>".encode())
        if isinstance(value, torch.nn.Module):
            _describe(dict(value.state_dict()), h, tensors)
        elif hasattr(value, "weights"):  # comfy.weight_adapter (LoRA, LoHa, ...)
            _describe(value.weights, h, tensors)
        elif callable(value):
            h.update(getattr(value, "__qualname__", "").encode())


def model_key(model: Any, clip: Any, vae: Any) -> str:
    """Id of the models Per-Image TI trains through AS PATCHED in the graph: the request key's
    model part for a release trained in ComfyUI (``pipeline.run_inputs``), where the CLI hashes
    the checkpoint file. Covers, per ModelPatcher (MODEL, CLIP, VAE): every base weight
    (``MODEL_KEY_SAMPLES`` evenly spaced values and the shape, from the unpatched original;
    not ``UNLOADED_KEYS``),
    every weight patch (a LoRA's tensors, strengths, offsets: ``patcher.patches``), object
    patches (e.g. a sampling override) and weight wrappers; and the CLIP's ``layer_idx`` (CLIP
    Set Last Layer). So a LoRA or any other patch is a new request, and an identical graph after
    a restart is the same request. Deterministic, read without loading the models to the GPU."""
    h = hashlib.sha256(b"dpagg-comfyui-model/1")
    for role, patcher in (
        ("model", model),
        ("clip", getattr(clip, "patcher", None)),
        ("vae", getattr(vae, "patcher", None)),
    ):
        h.update(f"\x00{role}".encode())
        if patcher is None:
            h.update(b"-")
            continue
        base = patcher.get_key_patches()
        keys = sorted(k for k in base if not k.endswith(UNLOADED_KEYS))
        h.update("\n".join(keys).encode())
        weights = [base[k][0][0] for k in keys if isinstance(base[k][0][0], torch.Tensor)]
        h.update(fingerprint(_sampled(weights, MODEL_KEY_SAMPLES, h)).encode())
        patch_tensors: list[torch.Tensor] = []
        patches = getattr(patcher, "patches", {}) or {}
        for k in sorted(patches):
            h.update(f"\x00patch {k}".encode())
            for strength_patch, value, strength_model, offset, function in patches[k]:
                _describe((strength_patch, strength_model, offset, function), h, patch_tensors)
                _describe(value, h, patch_tensors)
        objects = getattr(patcher, "object_patches", {}) or {}
        for k in sorted(objects):
            h.update(f"\x00object {k}".encode())
            _describe(objects[k], h, patch_tensors)
        wrappers = getattr(patcher, "weight_wrapper_patches", {}) or {}
        for k in sorted(wrappers):
            h.update(f"\x00wrapper {k}".encode())
            _describe(list(wrappers[k]), h, patch_tensors)
        if patch_tensors:
            h.update(fingerprint(_sampled(patch_tensors, PATCH_SAMPLES, h)).encode())
    h.update(f"\x00layer_idx {getattr(clip, 'layer_idx', None)!r}".encode())
    return h.hexdigest()[:32]
