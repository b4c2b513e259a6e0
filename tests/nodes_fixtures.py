"""Shared helpers of the ComfyUI node pack tests (``tests/test_nodes_*.py``), with ComfyUI absent.

``tests/comfy_stub`` stands in for the few ComfyUI names the nodes import (API shapes only). Every
privacy property checked in those modules - ledger, budget, noise, files, per-image independence -
runs the real ``dpagg_core`` code. The real ComfyUI is covered by ``test_comfyui_integration.py``.
The fixtures (``pack``, ``comfy_base``, ``tiny_backend``, ``private_folder``, ``fake_checkpoint``,
``counted_training``) are registered in ``tests/conftest.py`` and implemented here.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

import numpy as np
import torch
from image_kinds import write_mixed_sizes
from PIL import Image

from dpagg_core.io.embeddings import EmbeddingSet

REPO = Path(__file__).resolve().parent.parent


STUB = Path(__file__).resolve().parent / "comfy_stub"


STUB_MODULES = ("comfy_api", "comfy", "comfy_execution", "folder_paths", "nodes")


def _drop_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in STUB_MODULES:
            del sys.modules[name]


def pack_modules():
    """The pack's ``nodes`` package imported against the stub; removed again afterwards so no
    other test module sees a fake ``comfy_api``."""
    _drop_modules()
    sys.path[:0] = [str(STUB), str(REPO)]
    try:
        nodes = importlib.import_module("nodes")
        yield {
            "nodes": nodes,
            "common": importlib.import_module("nodes.common"),
            "load_private_images": importlib.import_module("nodes.load_private_images"),
            "load_public_images": importlib.import_module("nodes.load_public_images"),
            "public_style": importlib.import_module("nodes.public_style"),
            "rehearse": importlib.import_module("nodes.rehearse"),
            "per_image_ti": importlib.import_module("nodes.per_image_ti"),
            "clip_embeddings": importlib.import_module("nodes.clip_embeddings"),
            "privacy_accountant": importlib.import_module("nodes.privacy_accountant"),
            "public_basis": importlib.import_module("nodes.public_basis"),
            "dp_aggregate": importlib.import_module("nodes.dp_aggregate"),
            "folder_paths": importlib.import_module("folder_paths"),
            "io": importlib.import_module("comfy_api.latest").io,
            "utils": importlib.import_module("comfy.utils"),
            "mm": importlib.import_module("comfy.model_management"),
            "ExecutionBlocker": importlib.import_module(
                "comfy_execution.graph_utils"
            ).ExecutionBlocker,
        }
    finally:
        for p in (str(STUB), str(REPO)):
            sys.path.remove(p)
        _drop_modules()


def comfy_base_folder(pack, tmp_path, monkeypatch):
    """A ComfyUI-like folder (models/embeddings, user, output); the ledger goes to user/ as in
    ComfyUI (DPAGG_LEDGER unset)."""
    monkeypatch.setattr(pack["folder_paths"], "base_path", str(tmp_path))
    monkeypatch.delenv("DPAGG_LEDGER", raising=False)
    monkeypatch.setattr(pack["mm"], "interrupt_processing", False)
    pack["utils"].UPDATES.clear()
    return tmp_path


def ti_set(n=6, v=1, dim=16, seed=0, dataset_id="ds-test0000000000000000000000000000"):
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn((v, dim), generator=g)
    vecs = centre + 0.1 * torch.randn((n, v, dim), generator=g)
    return EmbeddingSet(
        vectors={"emb_params": vecs},
        kind="textual_inversion",
        model_family="sd1",
        base_model_id="test-model",
        centre={"emb_params": centre},
        initializer="painting",
        dataset_id=dataset_id,
    )


def aggregate(pack, eset, plan, **kw):
    args = {
        "clip_norm": 1.0,
        "centre": "initializer",
        "name": "mystyle",
        "mode": "clip",
        "budget_epsilon": 0.0,
        "budget_delta": 0.0,
    } | kw
    return pack["dp_aggregate"].DPAggregate.execute(embedding_set=eset, plan=plan, **args)


def widget_ids(node_cls, io) -> list[str]:
    widgets = (io.Int, io.Float, io.String, io.Boolean, io.Combo)
    return [
        i.id
        for i in node_cls.define_schema().inputs
        if any(isinstance(i, w.Input) for w in widgets)
    ]


def acc_kwargs(**kw):
    base = {
        "mode": "target epsilon -> noise",
        "epsilon": 2.0,
        "noise_multiplier": 1.0,
        "delta": 1e-5,
        "n": 10,
        "sampling": "full",
        "m": 4,
        "q": 0.5,
        "releases": 1,
    }
    return base | kw


TI_WIDGETS = {
    "steps": [2],
    "learning_rate": [0.01],
    "vectors": [2],
    "initializer": ["painting"],
    "templates": ["style"],
    "resolution": [32],
    "batch_size": [2],
    "training_seed": [0],
}


def use_tiny_backend(pack, monkeypatch):
    from tiny_models import tiny_pipeline

    from dpagg_core.training.diffusers_backend import DiffusersBackend

    backend = DiffusersBackend.from_pipeline(tiny_pipeline(), base_model_id="tiny-test")
    calls = []

    def factory(model, clip, vae):
        calls.append((model, clip, vae))
        return contextlib.nullcontext(backend)

    monkeypatch.setattr(pack["per_image_ti"], "_make_backend", factory)
    # the request key's model part: stub objects are no ModelPatchers (the real one is tested
    # on patcher-like objects in test_a_lora_like_patch_is_a_new_request)
    monkeypatch.setattr(pack["per_image_ti"], "_model_key", lambda m, c, v: f"stub:{m}:{c}:{v}")
    return calls


def comfy_images(n, size=32, seed=0):
    return torch.rand((n, size, size, 3), generator=torch.Generator().manual_seed(seed))


class FakeClipVision:
    """Encodes an image as a fixed linear map of its pixels (stands in for CLIP vision)."""

    def __init__(self, dim=8):
        self.calls = []
        self.w = torch.randn((3, dim), generator=torch.Generator().manual_seed(5))
        self.model = torch.nn.Linear(3, dim)

    def encode_image(self, image, crop=True):
        self.calls.append((tuple(image.shape), crop))
        return {"image_embeds": image.mean(dim=(1, 2)) @ self.w}


def write_private_folder(comfy_base):
    """ComfyUI/input/mine: three pictures of different sizes and aspect ratios."""
    folder = comfy_base / "input" / "mine"
    write_mixed_sizes(folder)
    return folder


def originals_as_comfy_images(folder: Path) -> list[torch.Tensor]:
    """What ComfyUI's Load Image hands over for each file: full size, 8-bit values / 255."""
    return [
        torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), np.float32) / 255)[None]
        for p in sorted(folder.iterdir())
    ]


def use_fake_checkpoint(pack, monkeypatch):
    """The Public Basis node's token-table seam: a 49408-row table of width 16 named like the
    ComfyUI backend names checkpoints (``comfyui:<family>:<hash>``)."""
    table = torch.randn((49408, 16), generator=torch.Generator().manual_seed(0))
    calls = []

    def tables(model, clip):
        calls.append((model, clip))
        return "sd1", "comfyui:sd1:0123456789abcdef", {"emb_params": table}

    monkeypatch.setattr(pack["public_basis"], "_checkpoint_tables", tables)
    return calls


def count_training(pack, monkeypatch):
    """``ti.train_embeddings`` made NON-deterministic on purpose (as on a GPU), counting calls."""
    real, calls = pack["per_image_ti"].ti.train_embeddings, []

    def noisy(*args, **kwargs):
        calls.append(1)
        eset = real(*args, **kwargs)
        for key, t in eset.vectors.items():
            eset.vectors[key] = t + 1e-3 * torch.randn_like(t)
        return eset

    monkeypatch.setattr(pack["per_image_ti"].ti, "train_embeddings", noisy)
    return calls
