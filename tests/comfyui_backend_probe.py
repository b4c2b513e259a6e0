"""Run Per-Image TI's ComfyUI backend on real ComfyUI objects and report what changed.

Not a test module: ``tests/test_comfyui_integration.py`` runs it with ComfyUI's own Python
(``COMFYUI_DIR/.venv``) as ``python comfyui_backend_probe.py COMFYUI_DIR CKPT OUT.json [--gpu]``. It

1. loads the checkpoint the way Load Checkpoint does (under ``torch.inference_mode()``);
2. records the originals: every weight (sha256), the patchers' state, every module's
   ``forward``/``weight_function``/``bias_function``/``training``, parameters' ``requires_grad``,
   CLIP layer options, and two reference outputs (a CLIP text encoding, a UNet evaluation);
3. runs the Per-Image TI node's ``execute`` (2 images, batch 2) and, for invariant 1, the same
   training with batch 1 (each image alone in its own chunk; a one-image set is refused);
4. records everything again and writes the comparison and timings as JSON.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

COMFY, CKPT, OUT = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(COMFY))
sys.path.append(str(REPO))

import torch  # noqa: E402

torch.manual_seed(0)
t0 = time.time()
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()  # ComfyUI's own flags: --cpu unless a GPU is wanted
sys.argv = [sys.argv[0]] + (["--cpu"] if "--gpu" not in sys.argv else [])
import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402

report: dict = {"timings": {}}


def state(model, clip) -> dict:
    """Everything the backend could touch, as comparable plain values."""
    out: dict = {}
    for label, root in (("unet", model.model), ("clip", clip.cond_stage_model)):
        for name, m in root.named_modules():
            d = m.__dict__
            out[f"{label}:{name}:training"] = m.training
            for attr in ("forward", "weight_function", "bias_function"):
                v = d.get(attr, "<absent>")
                out[f"{label}:{name}:{attr}"] = (
                    [repr(f) for f in v] if isinstance(v, list) else repr(v)
                )
            for attr in ("layer", "layer_idx", "return_projected_pooled"):
                if attr in d:
                    out[f"{label}:{name}:{attr}"] = repr(d[attr])
        for name, p in root.named_parameters():
            out[f"{label}:{name}:requires_grad"] = p.requires_grad
    for label, patcher in (("model_patcher", model), ("clip_patcher", clip.patcher)):
        out[f"{label}:patches"] = sorted(patcher.patches)
        out[f"{label}:object_patches"] = sorted(patcher.object_patches)
        out[f"{label}:weight_wrapper_patches"] = sorted(patcher.weight_wrapper_patches)
        out[f"{label}:backup"] = sorted(patcher.backup)
        out[f"{label}:model_options"] = repr(patcher.model_options)
    for enc in ("clip_l", "clip_g", "clip_h"):
        tok = getattr(clip.tokenizer, enc, None)
        if tok is not None:
            out[f"tokenizer:{enc}"] = sorted((k, repr(v)) for k, v in tok.__dict__.items())
    return out


def weight_hashes(*roots) -> dict:
    out = {}
    for i, root in enumerate(roots):
        for name, t in root.state_dict().items():
            out[f"{i}:{name}"] = hashlib.sha256(
                t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            ).hexdigest()
    return out


def reference_outputs(model, clip) -> dict:
    """A CLIPTextEncode and a UNet evaluation, as ComfyUI would compute them."""
    with torch.inference_mode():
        tokens = clip.tokenize("a lighthouse, in the style of painting")
        cond = clip.encode_from_tokens(tokens)
        comfy.model_management.load_models_gpu([model])
        g = torch.Generator().manual_seed(1)
        x = torch.randn((1, 4, 8, 8), generator=g)
        sigma = model.model.model_sampling.sigmas[500:501].float()
        den = model.model.apply_model(x, sigma, c_crossattn=cond.float())
    return {"cond": cond.clone(), "denoised": den.clone()}


with torch.inference_mode():  # ComfyUI loads checkpoints inside inference mode
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(
        str(CKPT), output_vae=True, output_clip=True, embedding_directory=[]
    )[:3]
report["timings"]["load_s"] = round(time.time() - t0, 1)

ref_before = reference_outputs(model, clip)
state_before = state(model, clip)
hashes_before = weight_hashes(model.model, clip.cond_stage_model, vae.first_stage_model)

# Load the pack as ComfyUI does (a package from its folder; ComfyUI's own ``nodes`` stays first).
import importlib.util  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "dpagg_pack", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
)
_pack = importlib.util.module_from_spec(_spec)
sys.modules["dpagg_pack"] = _pack
_spec.loader.exec_module(_pack)
from dpagg_pack.nodes.per_image_ti import PerImageTI  # noqa: E402

g = torch.Generator().manual_seed(0)
images = torch.rand((2, 64, 64, 3), generator=g)
widgets = {
    "steps": [2],
    "learning_rate": [0.05],
    "vectors": [1],
    "initializer": ["painting"],
    "templates": ["style"],
    "resolution": [64],
    "training_seed": [7],
}


def run(imgs, batch):
    t = time.time()
    with torch.inference_mode():  # as ComfyUI executes nodes
        out = PerImageTI.execute(
            model=[model], clip=[clip], vae=[vae], images=[imgs], batch_size=[batch], **widgets
        )
        eset = out.args[0].materialize()  # Per-Image TI defers its training (a job)
    return eset, time.time() - t


eset, secs = run(images, 2)
report["timings"]["train_2_images_batch2_s"] = round(secs, 1)
# batch 1: each image trains alone in its own chunk (a set of one image is refused: n >= 2)
alone, secs = run(images, 1)
report["timings"]["train_2_images_batch1_s"] = round(secs, 1)

ref_after = reference_outputs(model, clip)
state_after = state(model, clip)
hashes_after = weight_hashes(model.model, clip.cond_stage_model, vae.first_stage_model)

# The request key's model part (comfy_model_key.model_key): the same on a clone, another with a
# weight patch (a LoRA-like "diff" on one UNet weight) or CLIP Set Last Layer.
from dpagg_pack.nodes.comfy_model_key import model_key  # noqa: E402

key0 = model_key(model, clip, vae)
lora = model.clone()
name = next(k for k in lora.model_state_dict() if k.endswith("input_blocks.1.0.in_layers.2.weight"))
weight = lora.model_state_dict()[name]
lora.add_patches({name: (torch.full_like(weight, 1e-3),)}, 0.5)
skip = clip.clone()
skip.clip_layer(-2)
report["model_key_same_on_clone"] = model_key(model.clone(), clip.clone(), vae) == key0
report["model_key_changed_by_patch"] = model_key(lora, clip, vae) != key0
report["model_key_changed_by_clip_skip"] = model_key(model, skip, vae) != key0

vec = eset.vectors["emb_params"]
centre = eset.centre["emb_params"]
changed_state = sorted(k for k in state_before if state_before[k] != state_after.get(k))
changed_state += sorted(set(state_after) - set(state_before))
report.update(
    {
        "n": eset.n,
        "shape": list(vec.shape),
        "model_family": eset.model_family,
        "base_model_id": eset.base_model_id,
        "moved_from_init": [float((vec[i] - centre).norm()) for i in range(eset.n)],
        "rows_distinct": bool(not torch.equal(vec[0], vec[1])),
        "row0_batch_vs_alone_maxabs": float((vec[0] - alone.vectors["emb_params"][0]).abs().max()),
        "row0_scale": float(vec[0].abs().max()),
        "state_keys_checked": len(state_before),
        "state_changed": changed_state[:50],
        "weights_checked": len(hashes_before),
        "weights_changed": sorted(k for k in hashes_before if hashes_before[k] != hashes_after[k]),
        "cond_equal": bool(torch.equal(ref_before["cond"], ref_after["cond"])),
        "denoised_equal": bool(torch.equal(ref_before["denoised"], ref_after["denoised"])),
        "loaded_models_after": len(comfy.model_management.current_loaded_models),
    }
)
report["timings"]["total_s"] = round(time.time() - t0, 1)
OUT.write_text(json.dumps(report, indent=1))
print(json.dumps(report)[:2000])
