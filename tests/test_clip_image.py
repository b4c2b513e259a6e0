"""Per-image CLIP image embeddings on a tiny random CLIPVisionModelWithProjection (32 px)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from PIL import Image

from dpagg_core.errors import DpaggError
from dpagg_core.io.images import load_image_folder
from dpagg_core.training.clip_image import clip_image_embeddings, load_clip_vision
from dpagg_core.training.models import fingerprint

PROJ = 16


def tiny_vision(seed: int = 0, projection: bool = True):
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=PROJ,
    )
    cls = CLIPVisionModelWithProjection if projection else CLIPVisionModel
    return cls(cfg).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip_vision")
    tiny_vision().save_pretrained(d)
    return d


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(d / f"{i}.png")
    return d


def reference(model, folder, n, mean=None, std=None):
    """transformers' own (torchvision-free) CLIP processor + forward + L2 normalisation."""
    from transformers import CLIPImageProcessorPil

    kw = {} if mean is None else {"image_mean": mean, "image_std": std}
    proc = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, **kw
    )
    pils = [Image.open(folder / f"{i}.png").convert("RGB") for i in range(n)]
    with torch.no_grad():
        emb = model(pixel_values=proc(pils, return_tensors="pt").pixel_values).image_embeds
    return emb / emb.norm(dim=-1, keepdim=True)


def test_embedding_set_from_path(model_dir, image_dir):
    es = clip_image_embeddings(model_dir, image_dir)
    assert es.kind == "clip_image" and es.model_family == "clip_vision"
    emb = es.vectors["image_embeds"]
    assert emb.shape == (5, 1, PROJ) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5, 1), atol=1e-6)
    assert es.dataset_id == load_image_folder(image_dir, 32).dataset_id
    model = load_clip_vision(model_dir)
    patch = model.vision_model.embeddings.patch_embedding.weight
    assert es.base_model_id == fingerprint([patch])
    assert es.base_model_id != fingerprint(
        [tiny_vision(seed=1).vision_model.embeddings.patch_embedding.weight]
    )
    # Same numbers as transformers' CLIP processor on images already at the model's size.
    assert torch.allclose(emb[:, 0], reference(model, image_dir, 5), atol=1e-5)


def test_instance_and_path_agree_and_unnormalised(model_dir, image_dir):
    model = load_clip_vision(model_dir)
    by_path = clip_image_embeddings(model_dir, image_dir)
    by_obj = clip_image_embeddings(model, image_dir)
    assert torch.equal(by_path.vectors["image_embeds"], by_obj.vectors["image_embeds"])
    assert by_path.base_model_id == by_obj.base_model_id
    raw = clip_image_embeddings(model, image_dir, normalize=False).vectors["image_embeds"]
    norms = raw.norm(dim=-1, keepdim=True)
    assert not torch.allclose(norms, torch.ones_like(norms))
    assert torch.allclose(raw / norms, by_obj.vectors["image_embeds"], atol=1e-6)


def test_rows_independent_of_batch_composition(model_dir, image_dir, tmp_path):
    model = load_clip_vision(model_dir)
    one = clip_image_embeddings(model, image_dir, batch_size=1).vectors["image_embeds"]
    five = clip_image_embeddings(model, image_dir, batch_size=5).vectors["image_embeds"]
    three = clip_image_embeddings(model, image_dir, batch_size=3).vectors["image_embeds"]
    assert torch.allclose(one, five, atol=1e-6) and torch.allclose(one, three, atol=1e-6)
    # Other images in the set (a subset, a different neighbour) leave a row unchanged.
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "0.png").write_bytes((image_dir / "0.png").read_bytes())
    Image.new("RGB", (32, 32), (7, 200, 9)).save(sub / "other.png")
    pair = clip_image_embeddings(model, sub, batch_size=2).vectors["image_embeds"]
    assert torch.allclose(pair[0], one[0], atol=1e-6)


def test_preprocessor_config_stats_are_used(tmp_path, image_dir):
    from transformers import CLIPImageProcessorPil

    model = tiny_vision()
    model.save_pretrained(tmp_path / "m")
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    CLIPImageProcessorPil(image_mean=mean, image_std=std).save_pretrained(tmp_path / "m")
    es = clip_image_embeddings(tmp_path / "m", image_dir)
    ref = reference(model, image_dir, 5, mean, std)
    assert torch.allclose(es.vectors["image_embeds"][:, 0], ref, atol=1e-5)
    default = clip_image_embeddings(model, image_dir).vectors["image_embeds"][:, 0]
    assert not torch.allclose(default, ref, atol=1e-3)


def test_in_memory_and_resized_inputs(model_dir, image_dir):
    model = load_clip_vision(model_dir)
    from_folder = clip_image_embeddings(model, image_dir).vectors["image_embeds"]
    arrays = [np.asarray(Image.open(image_dir / f"{i}.png")) for i in range(5)]
    tensor = torch.from_numpy(np.stack(arrays)).float() / 255.0  # [N, H, W, 3] like ComfyUI
    from_tensor = clip_image_embeddings(model, tensor).vectors["image_embeds"]
    assert torch.allclose(from_folder, from_tensor, atol=1e-6)
    loaded64 = load_image_folder(image_dir, 64)  # e.g. loaded for SD at another resolution
    es = clip_image_embeddings(model, loaded64)
    assert es.vectors["image_embeds"].shape == (5, 1, PROJ)
    assert es.dataset_id == loaded64.dataset_id


def test_offline_by_path(model_dir, image_dir, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert clip_image_embeddings(model_dir, image_dir).n == 5


def test_errors(model_dir, image_dir, tmp_path):
    with pytest.raises(DpaggError, match="does not exist"):
        clip_image_embeddings(tmp_path / "nope", image_dir)
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(DpaggError, match="not a transformers model folder"):
        clip_image_embeddings(tmp_path / "w.safetensors", image_dir)
    tiny_vision(projection=False).save_pretrained(tmp_path / "noproj")
    with pytest.raises(DpaggError, match="missing or mismatched.*visual_projection"):
        clip_image_embeddings(tmp_path / "noproj", image_dir)
    with pytest.raises(DpaggError, match="batch_size"):
        clip_image_embeddings(model_dir, image_dir, batch_size=0)
    with pytest.raises(DpaggError, match="images must be"):
        clip_image_embeddings(model_dir, 42)
    with pytest.raises(DpaggError, match="model_path_or_model"):
        clip_image_embeddings(object(), image_dir)
