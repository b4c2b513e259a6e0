"""Offline model loading: tiny SD1 / SD2 / SDXL pipelines saved as diffusers folders and as
original-layout (LDM) single files, loaded by dpagg_core.training.models.load_pipeline.

The LDM layout is written by an independent inverse mapping below (from the public LDM key
naming), so a round trip through diffusers' converter must reproduce every weight exactly.
"""

from __future__ import annotations

import json
import os
import re
import socket

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_pipeline, tiny_unet, tiny_vae

from dpagg_core.errors import DpaggError
from dpagg_core.training import models
from dpagg_core.training.models import (
    base_model_id_of,
    detect_family,
    detect_prediction_type,
    load_pipeline,
)
from dpagg_core.training.tokenizer import clip_tokenizer

# --------------------------------------------------------------------------------------------
# diffusers -> original (LDM) layout, written for these tests
# --------------------------------------------------------------------------------------------

_RES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def unet_to_ldm(sd: dict, layers: int) -> dict:
    step = layers + 1
    up_attn = {m[1] for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for k, v in sd.items():
        if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
            side, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            idx = 1 + i * step + j if side == "down" else i * step + j
            if kind == "resnets":
                head, _, tail = rest.partition(".")
                rest = f"{_RES[head]}.{tail}"
            blocks = "input_blocks" if side == "down" else "output_blocks"
            n = f"{blocks}.{idx}.{0 if kind == 'resnets' else 1}.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
            n = f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", k):
            n = f"output_blocks.{int(m[1]) * step + layers}.{2 if m[1] in up_attn else 1}.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(\w+)\.(.+)", k):
            n = f"middle_block.{2 * int(m[1])}.{_RES[m[2]]}.{m[3]}"
        elif k.startswith("mid_block.attentions.0."):
            n = "middle_block.1." + k[len("mid_block.attentions.0.") :]
        else:
            head, _, tail = k.rpartition(".")
            n = f"{_UNET_FIXED[head]}.{tail}"
        out["model.diffusion_model." + n] = v
    return out


def vae_to_ldm(sd: dict, levels: int) -> dict:
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        n = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        n = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", n)
        n = re.sub(
            r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", n
        )
        n = re.sub(
            r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
            lambda m: (
                f"decoder.up.{levels - 1 - int(m[1])}."
                + ("block." if m[2] == "resnets" else "upsample.")
            ),
            n,
        )
        n = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", n)
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", n):
            n = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if v.ndim == 2:  # linear -> 1x1 conv
                v = v[:, :, None, None]
        out["first_stage_model." + n] = v
    return out


def clip_to_ldm(sd: dict, prefix: str) -> dict:
    return {
        prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()
    }


def open_clip_to_ldm(te, prefix: str, extra_layers: int = 0) -> dict:
    """HF CLIP text model -> OpenCLIP layout (fused in_proj, resblocks, transposed projection)."""
    sd = {k.removeprefix("text_model."): v for k, v in te.state_dict().items()}
    out = {
        "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "ln_final.weight": sd["final_layer_norm.weight"],
        "ln_final.bias": sd["final_layer_norm.bias"],
        "logit_scale": torch.tensor(4.6),
    }
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    n_layers = te.config.num_hidden_layers
    for i in range(n_layers + extra_layers):
        src = min(i, n_layers - 1)  # extra (unused) layers, like SD2's 24th
        p = f"encoder.layers.{src}."
        r = f"transformer.resblocks.{i}."
        for w in ("weight", "bias"):
            out[r + f"attn.in_proj_{w}"] = torch.cat(
                [sd[p + f"self_attn.{q}_proj.{w}"] for q in "qkv"]
            ).clone()
            out[r + f"attn.out_proj.{w}"] = sd[p + f"self_attn.out_proj.{w}"]
            out[r + f"ln_1.{w}"] = sd[p + f"layer_norm1.{w}"]
            out[r + f"ln_2.{w}"] = sd[p + f"layer_norm2.{w}"]
            out[r + f"mlp.c_fc.{w}"] = sd[p + f"mlp.fc1.{w}"]
            out[r + f"mlp.c_proj.{w}"] = sd[p + f"mlp.fc2.{w}"]
    return {prefix + k: v for k, v in out.items()}


def pipe_to_ldm(pipe, family: str) -> dict:
    sd = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block)
    sd.update(vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    if family == "sd1":
        sd.update(clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    elif family == "sd2":
        sd.update(open_clip_to_ldm(pipe.text_encoder, "cond_stage_model.model.", extra_layers=1))
    else:
        sd.update(
            clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer.")
        )
        sd.update(open_clip_to_ldm(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    return {k: v.clone().contiguous() for k, v in sd.items()}


# --------------------------------------------------------------------------------------------
# Tiny SD2 / SDXL pipelines (SD1 comes from tests/tiny_models.py)
# --------------------------------------------------------------------------------------------


def _te(cls_name: str, hidden: int, act: str, seed: int):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
    )
    return getattr(transformers, cls_name)(cfg).eval()


def tiny_sd2():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tok = clip_tokenizer()
    tok.pad_token = "!"
    return StableDiffusionPipeline(
        vae=tiny_vae(1),
        text_encoder=_te("CLIPTextModel", 48, "gelu", 1),
        tokenizer=tok,
        unet=tiny_unet(48, seed=1),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 64,
        transformer_layers_per_block=(1, 2),
        norm_num_groups=8,
    ).eval()
    tok2 = clip_tokenizer()
    tok2.pad_token = "!"
    return StableDiffusionXLPipeline(
        vae=tiny_vae(2),
        text_encoder=_te("CLIPTextModel", 32, "quick_gelu", 2),
        text_encoder_2=_te("CLIPTextModelWithProjection", 64, "gelu", 3),
        tokenizer=clip_tokenizer(),
        tokenizer_2=tok2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear"),
    )


def assert_same_weights(a, b, parts=("unet", "vae", "text_encoder")):
    for part in parts:
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert set(sa) == set(sb), part
        for k in sa:
            assert torch.equal(sa[k].float(), sb[k].float()), f"{part}.{k}"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd1")
    pipe = tiny_pipeline()
    pipe.save_pretrained(d / "folder")
    save_file(pipe_to_ldm(pipe, "sd1"), d / "model.safetensors")
    return pipe, d


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_diffusers_folder_loads(sd1):
    pipe, d = sd1
    lm = load_pipeline(d / "folder")
    assert (lm.family, lm.prediction_type, lm.source) == ("sd1", "epsilon", "diffusers")
    assert_same_weights(pipe, lm.pipe)
    assert lm.base_model_id == base_model_id_of([pipe.text_encoder])
    assert re.fullmatch(r"[0-9a-f]{16}", lm.base_model_id)
    assert lm.pipe.safety_checker is None


def test_single_file_matches_folder_and_diffusers_own_loader(sd1):
    from diffusers import StableDiffusionPipeline

    pipe, d = sd1
    lm = load_pipeline(d / "model.safetensors", config=d / "folder")
    assert (lm.family, lm.prediction_type, lm.source) == ("sd1", "epsilon", "single_file")
    assert_same_weights(pipe, lm.pipe)
    assert lm.base_model_id == load_pipeline(d / "folder").base_model_id
    ref = StableDiffusionPipeline.from_single_file(
        str(d / "model.safetensors"),
        config=str(d / "folder"),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    assert_same_weights(ref, lm.pipe)
    text = "a lighthouse, in the style of <x>"
    assert lm.pipe.tokenizer(text).input_ids == ref.tokenizer(text).input_ids


def test_ckpt_and_fp16_load_with_same_base_model_id(sd1, tmp_path):
    pipe, d = sd1
    sd = pipe_to_ldm(pipe, "sd1")
    torch.save({"state_dict": {k: v.half() for k, v in sd.items()}}, tmp_path / "m.ckpt")
    lm16 = load_pipeline(tmp_path / "m.ckpt", config=d / "folder", dtype=torch.float16)
    assert lm16.pipe.unet.dtype == torch.float16 and lm16.pipe.text_encoder.dtype == torch.float16
    lm32 = load_pipeline(tmp_path / "m.ckpt", config=d / "folder")
    assert lm32.pipe.unet.dtype == torch.float32
    # fp16-rounded weights hash to the same id as the fp32 original (id rounds to fp16).
    assert lm16.base_model_id == lm32.base_model_id == base_model_id_of([pipe.text_encoder])
    other = tiny_pipeline(seed=1)
    assert base_model_id_of([other.text_encoder]) != lm32.base_model_id
    # Placeholder tokens added for TI do not change the id.
    te = lm32.pipe.text_encoder
    te.resize_token_embeddings(te.get_input_embeddings().weight.shape[0] + 2)
    assert base_model_id_of([te]) == lm32.base_model_id


def test_sd2_single_file(tmp_path):
    pipe = tiny_sd2()
    pipe.save_pretrained(tmp_path / "folder")
    save_file(pipe_to_ldm(pipe, "sd2"), tmp_path / "sd2.safetensors")
    lm = load_pipeline(tmp_path / "sd2.safetensors", config=tmp_path / "folder")
    assert lm.family == "sd2"
    # No v-pred probe key in a 2-level tiny UNet: the 768-v default, with a warning.
    assert lm.prediction_type == "v_prediction" and lm.warnings
    assert lm.pipe.scheduler.config.prediction_type == "v_prediction"
    assert_same_weights(pipe, lm.pipe)
    assert lm.pipe.tokenizer.pad_token == "!"
    lm_eps = load_pipeline(
        tmp_path / "sd2.safetensors", config=tmp_path / "folder", prediction_type="epsilon"
    )
    assert lm_eps.prediction_type_source == "argument"
    assert lm_eps.pipe.scheduler.config.prediction_type == "epsilon"


def test_sdxl_single_file(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = tiny_sdxl()
    pipe.save_pretrained(tmp_path / "folder")
    save_file(pipe_to_ldm(pipe, "sdxl"), tmp_path / "xl.safetensors")
    lm = load_pipeline(tmp_path / "xl.safetensors", config=tmp_path / "folder")
    assert isinstance(lm.pipe, StableDiffusionXLPipeline)
    assert (lm.family, lm.prediction_type) == ("sdxl", "epsilon")
    assert_same_weights(pipe, lm.pipe, ("unet", "vae", "text_encoder", "text_encoder_2"))
    assert lm.base_model_id == base_model_id_of([pipe.text_encoder, pipe.text_encoder_2])
    folder = load_pipeline(tmp_path / "folder")
    assert folder.family == "sdxl" and folder.base_model_id == lm.base_model_id
    with pytest.raises(DpaggError, match="contradicts"):
        load_pipeline(tmp_path / "xl.safetensors", config=tmp_path / "folder", family="sd1")


def test_loading_never_touches_the_network(sd1, monkeypatch):
    _, d = sd1

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert load_pipeline(d / "model.safetensors", config=d / "folder").family == "sd1"
    assert load_pipeline(d / "folder").family == "sd1"
    assert "HF_HUB_OFFLINE" not in os.environ  # the guard restores the environment


def test_prediction_type_sources(sd1, tmp_path):
    pipe, d = sd1
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes((d / "model.safetensors").read_bytes())
    (tmp_path / "m.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    lm = load_pipeline(ckpt, config=d / "folder")
    assert (lm.prediction_type, lm.prediction_type_source) == ("v_prediction", "sidecar m.yaml")
    assert lm.pipe.scheduler.config.prediction_type == "v_prediction"
    lm = load_pipeline(ckpt, config=d / "folder", prediction_type="epsilon")
    assert lm.prediction_type == "epsilon"
    (tmp_path / "m.yaml").write_text("model: [unclosed")
    with pytest.raises(DpaggError, match="m.yaml"):
        load_pipeline(ckpt, config=d / "folder")
    # The v_pred marker key, and the SD2 heuristic on the probe tensor.
    assert detect_prediction_type({"v_pred": torch.zeros(())}, "sdxl")[0] == "v_prediction"
    probe = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    g = torch.Generator().manual_seed(0)
    wide, narrow = torch.randn(320, generator=g) * 0.3, torch.randn(320, generator=g) * 0.01
    assert detect_prediction_type({probe: wide}, "sd2")[0] == "v_prediction"
    assert detect_prediction_type({probe: narrow}, "sd2")[0] == "epsilon"
    assert detect_prediction_type({}, "sd1") == ("epsilon", "sd1 default")


def _keys(*names: str, **shaped) -> dict:
    sd = {n: torch.zeros(1) for n in names}
    sd.update({k.replace("__", "."): torch.zeros(s) for k, s in shaped.items()})
    return sd


UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"


def test_family_detection_from_keys():
    conv = {UNET_KEY: torch.zeros(32, 4, 3, 3)}
    assert detect_family({**conv, "cond_stage_model.model.token_embedding.weight": 0}) == "sd2"
    xl = {
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": 0,
        "conditioner.embedders.1.model.token_embedding.weight": 0,
    }
    assert detect_family({**conv, **xl}) == "sdxl"
    sd1 = {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": 0}
    assert detect_family({**conv, **sd1}) == "sd1"
    inpaint = {UNET_KEY: torch.zeros(32, 9, 3, 3), **sd1}
    with pytest.raises(DpaggError, match="inpainting"):
        detect_family(inpaint)
    with pytest.raises(DpaggError, match="unknown model family"):
        detect_family(dict(conv))
    with pytest.raises(DpaggError, match="LoRA"):
        detect_family({"lora_unet_down_blocks_0.lora_down.weight": 0})
    with pytest.raises(DpaggError, match="textual-inversion embedding"):
        detect_family({"emb_params": 0})


def test_bad_inputs_are_clear_errors(sd1, tmp_path):
    pipe, d = sd1
    with pytest.raises(DpaggError, match="does not exist"):
        load_pipeline(tmp_path / "missing.safetensors")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.safetensors").write_bytes(b"")
    with pytest.raises(DpaggError, match="without model_index.json.*x.safetensors"):
        load_pipeline(tmp_path / "dir")
    (tmp_path / "m.bin").write_bytes(b"x")
    with pytest.raises(DpaggError, match="unsupported model file type"):
        load_pipeline(tmp_path / "m.bin")
    raw = (d / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DpaggError, match="cut.safetensors.*truncated"):
        load_pipeline(tmp_path / "cut.safetensors", config=d / "folder")
    torch.save(
        {"state_dict": {"a": torch.zeros(1)}, "cfg": DpaggError("a Python object")},
        tmp_path / "p.ckpt",
    )
    with pytest.raises(DpaggError, match="safely"):
        load_pipeline(tmp_path / "p.ckpt")
    sd = pipe_to_ldm(pipe, "sd1")
    del sd["model.diffusion_model.out.2.weight"]
    save_file(sd, tmp_path / "pruned.safetensors")
    with pytest.raises(DpaggError, match=r"UNet weights are missing.*out\.2\.weight|conv_out"):
        load_pipeline(tmp_path / "pruned.safetensors", config=d / "folder")
    with pytest.raises(DpaggError, match="family="):
        load_pipeline(d / "folder", family="sd3")
    with pytest.raises(DpaggError, match="config= only applies"):
        load_pipeline(d / "folder", config=d / "folder")
    with pytest.raises(DpaggError, match="prediction_type="):
        load_pipeline(d / "folder", prediction_type="sample")
    # Tiny weights against the real-size shipped SD1 config: a shape error, not random weights.
    with pytest.raises(DpaggError, match="cross-attention width 32 does not match sd1"):
        load_pipeline(d / "model.safetensors")


def test_shipped_configs_match_public_model_sizes():
    """Parameter counts of the public SD1.5 / SD2.1 / SDXL-base components (built on 'meta')."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def count(m):
        return sum(p.numel() for p in m.parameters())

    expected_unet = {"sd1": 859_520_964, "sd2": 865_910_724, "sd2-base": 865_910_724}
    expected_unet["sdxl"] = 2_567_463_684
    expected_te = {"sd1": 123_060_480, "sd2": 340_387_840, "sd2-base": 340_387_840}
    expected_te["sdxl"] = 123_060_480
    for name in models.SHIPPED_CONFIGS:
        cfg = models.config_dir(name)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg / "unet"))
            te = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder"))
        assert count(unet) == expected_unet[name], name
        assert count(te) == expected_te[name], name
        index = json.loads((cfg / "model_index.json").read_text())
        sched = json.loads((cfg / "scheduler" / "scheduler_config.json").read_text())
        assert sched["_class_name"] == index["scheduler"][1]
        v = "v_prediction" if name == "sd2" else "epsilon"
        assert sched["prediction_type"] == v
    cfg = models.config_dir("sd1")
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae"))
        te2 = CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(models.config_dir("sdxl") / "text_encoder_2")
        )
    assert count(vae) == 83_653_863
    assert count(te2) == 694_659_840


def test_shipped_tokenizers_are_the_clip_vocabulary(tmp_path):
    from transformers import CLIPTokenizer

    text = "A photo of a lighthouse at dusk, in the style of Monet; 1984 café"
    ref = clip_tokenizer()(text).input_ids
    pads = {}
    for name, sub in [("sd1", "tokenizer"), ("sd2", "tokenizer"), ("sdxl", "tokenizer_2")]:
        tok = CLIPTokenizer.from_pretrained(models.config_dir(name), subfolder=sub)
        assert tok(text).input_ids == ref
        assert len(tok) == 49408
        pads[name] = tok.pad_token
    assert pads == {"sd1": "<|endoftext|>", "sd2": "!", "sdxl": "!"}
    out = models.write_config("sdxl", tmp_path / "cfg")
    assert (out / "tokenizer_2" / "vocab.json").is_file()
    assert (out / "tokenizer" / "merges.txt").read_text().startswith("#version")


def test_tokenizer_inside_comfyui_needs_no_clip_package(tmp_path, monkeypatch):
    """With neither clip-anytorch nor open_clip installed (a ComfyUI env after installing the
    pack), the vocabulary comes from ComfyUI's own ``comfy/sd1_tokenizer`` files: the same ids."""
    import shutil
    import sys

    from dpagg_core.training import tokenizer

    text = "A photo of a lighthouse at dusk, in the style of Monet; 1984 café"
    ref = clip_tokenizer()(text).input_ids
    fake = tmp_path / "site" / "comfy"
    (fake / "sd1_tokenizer").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(models.config_dir("sd1") / "tokenizer" / f, fake / "sd1_tokenizer" / f)
    monkeypatch.setattr(tokenizer, "BPE_PROVIDERS", ("dpagg_no_such_package",))
    tokenizer._vocab_and_merges.cache_clear()
    with pytest.raises(DpaggError, match="none is needed"):
        tokenizer.clip_bpe_path()
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "comfy", raising=False)
    try:
        assert tokenizer.comfyui_tokenizer_dir() == fake / "sd1_tokenizer"
        assert tokenizer.clip_tokenizer()(text).input_ids == ref
    finally:
        tokenizer._vocab_and_merges.cache_clear()


def test_fingerprint_samples_stay_in_range_for_large_tensors():
    """float32 linspace rounded the last sample index of a tensor over 2^24 elements past its end
    (2^25 + 7 values: index 2^25 + 8, IndexError); small tensors keep their ids."""
    import torch

    from dpagg_core.privacy.identity import fingerprint

    big = torch.zeros(2**25 + 7)
    assert len(fingerprint([big], samples=16)) == 16
    small = torch.arange(1000.0).reshape(10, 100)
    assert fingerprint([small], samples=16) == fingerprint([small.clone()], samples=16)
