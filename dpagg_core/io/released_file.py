"""The released embedding file: ONE noised mean plus its privacy record (public by design).

A released file (:func:`write_released`) holds the output of the Gaussian mechanism. Writing it
is post-processing of a differentially private output, so it costs no budget (post-processing
theorem, Dwork & Roth 2014, Prop. 2.1). Its header metadata must hold nothing private
(docs/privacy.md invariant 6): only the record (all strings) and ``format``. Local paths are
refused in the record.

Layouts (safetensors; loaded by ComfyUI ``embedding:name``, A1111 and diffusers):

==============  =======================================================  ==================
family          tensors                                                  dtype
==============  =======================================================  ==================
sd1 / sd2       exactly ``emb_params`` ``[v, dim]`` (dim 768 / 1024)     float32
sdxl            exactly ``clip_l`` ``[v, 768]`` and ``clip_g`` ``[v, 1280]``  float32
clip_vision     exactly ``image_embeds`` ``[v, dim]``; ``v`` is 1 for one  float32
                CLIP image embedding (the ``[1, dim]`` shape image-prompt
                adapters take as ``image_embeds``)
==============  =======================================================  ==================

Widths are not pinned to the real models' (tiny test models use 32 / 64), but SDXL's ``clip_l``
must be narrower than ``clip_g`` so the two keys can never be swapped silently. ``a1111_pt``
also writes A1111's legacy ``.pt`` layout (:func:`_a1111_bytes`).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dpagg_core.errors import DpaggError
from dpagg_core.io.embeddings import (
    KEYS_BY_FAMILY,
    MAX_TI_VECTORS,
    PRIVATE_MARKER,
    _as_tensor,
    _check_float32_finite,
)
from dpagg_core.io.files import output_folder, read_safetensors, write_new_file
from dpagg_core.io.names import existing_stems, next_free_name, sanitize_name

RELEASE_FORMAT = "dpagg-release/1"

_ABS_PATH = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\|/|~[\\/]?)")


def _check_record(record: Mapping[str, str]) -> dict[str, str]:
    """Strings only, reserved keys kept, no local paths (invariant 6); adds ``format``."""
    if not isinstance(record, Mapping):
        raise DpaggError(f"record must be a dict of strings, got {type(record).__name__}")
    out: dict[str, str] = {}
    for k, v in record.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise DpaggError(
                f"record[{k!r}] = {v!r}: the privacy record must map strings to strings "
                "(format numbers with repr() before writing)"
            )
        if k == PRIVATE_MARKER:
            raise DpaggError(f"record key {k!r} is reserved for private embedding sets")
        if k == "format" and v != RELEASE_FORMAT:
            raise DpaggError(f"record key 'format' is reserved; dpagg writes {RELEASE_FORMAT!r}")
        if _ABS_PATH.match(v.strip()) or "\\" in v:
            raise DpaggError(
                f"record[{k!r}] looks like a local path ({v!r}); released metadata must hold no "
                "paths or file names (use a public model id or a hash instead)"
            )
        out[k] = v
    out["format"] = RELEASE_FORMAT
    return out


def _released_tensors(vectors: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if not isinstance(vectors, Mapping):
        raise DpaggError(f"vectors must be a dict of [vectors, dim] tensors, got {type(vectors)}")
    keys = set(vectors)
    layouts = [set(ks) for ks in dict.fromkeys(KEYS_BY_FAMILY.values())]
    if keys not in layouts:
        raise DpaggError(
            f"released vectors have keys {sorted(keys)}; use exactly one of "
            f"{[sorted(ks) for ks in layouts]} (SD1/SD2, SDXL, CLIP image)"
        )
    out: dict[str, torch.Tensor] = {}
    for key in sorted(keys):
        t = _as_tensor(vectors[key], f"vectors[{key!r}]")
        if not (t.is_floating_point()):
            raise DpaggError(f"vectors[{key!r}] has dtype {t.dtype}; it must be floating point")
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2:
            raise DpaggError(
                f"vectors[{key!r}] has shape {tuple(t.shape)}; a released embedding is "
                "[vectors, dim] (use EmbeddingSet.unflat on the released mean)"
            )
        t = t.to(torch.float32).contiguous().clone()
        _check_float32_finite(t, f"vectors[{key!r}]")
        if key != "image_embeds" and t.shape[0] > MAX_TI_VECTORS:
            raise DpaggError(f"vectors[{key!r}] has {t.shape[0]} vectors; CLIP fits at most 75")
        out[key] = t
    if keys == {"clip_l", "clip_g"}:
        if out["clip_l"].shape[0] != out["clip_g"].shape[0]:
            raise DpaggError("SDXL 'clip_l' and 'clip_g' need the same number of vectors")
        if out["clip_l"].shape[1] >= out["clip_g"].shape[1]:
            raise DpaggError("SDXL 'clip_l' must be narrower than 'clip_g' (768 vs 1280)")
    return out


def _a1111_bytes(name: str, tensor: torch.Tensor, record: dict[str, str]) -> bytes:
    """A1111's ``.pt`` embedding layout (``Embedding.save``), plus the record as strings.

    Serialised from memory so the zip's inner folder is ``archive``, not a temp file name. Only
    plain types: it loads with ``torch.load(weights_only=True)`` (ComfyUI, diffusers).
    """
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": tensor},
        "name": name,
        "step": 0,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
        "dpagg_record": dict(record),
    }
    buf = io.BytesIO()
    torch.save(data, buf)
    return buf.getvalue()


def write_released(
    out_dir: str | os.PathLike[str],
    name: str,
    vectors: Mapping[str, Any],
    record: Mapping[str, str],
    *,
    a1111_pt: bool = False,
) -> Path:
    """Write ONE released embedding ``<out_dir>/<name>.safetensors``; returns its path.

    ``vectors`` is ``{'emb_params': [v, dim]}`` (SD1/SD2), ``{'clip_l': [v, 768], 'clip_g':
    [v, 1280]}`` (SDXL) or ``{'image_embeds': [v, dim]}`` (CLIP image, v usually 1); floats are
    stored as float32. The header metadata is ``record`` (the privacy record, strings only, no
    local paths) plus ``format: dpagg-release/1``, nothing else. ``a1111_pt`` also writes
    ``<name>.pt`` in A1111's legacy format (SD1/SD2 only) beside it, for old A1111 builds; A1111
    and ComfyUI read the ``.safetensors`` directly, and seeing both in one folder they list the
    name twice, so copy the ``.pt`` elsewhere if you use it.

    Never overwrites: an existing file, or an embedding of the same name anywhere under
    ``out_dir`` (ComfyUI would pick either), is a DpaggError suggesting :func:`next_free_name`.
    Files are written atomically.
    """
    clean = sanitize_name(name)
    tensors = _released_tensors(vectors)
    meta = _check_record(record)
    if a1111_pt and set(tensors) != {"emb_params"}:
        raise DpaggError(
            "a1111_pt=True is for SD1/SD2 embeddings only; A1111 reads SDXL files as-is"
        )
    out = output_folder(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{clean}.safetensors"
    pt_target = out / f"{clean}.pt"
    clash = existing_stems(out).get(clean.lower())
    if clash is not None:
        raise DpaggError(
            f"an embedding named {clean!r} already exists ({clash}); dpagg never overwrites and "
            f"ComfyUI caches prompts by name: use a new name such as {next_free_name(out, clean)!r}"
        )
    import safetensors.torch

    write_new_file(target, safetensors.torch.save(tensors, metadata=meta), public=True)
    if a1111_pt:
        try:
            write_new_file(pt_target, _a1111_bytes(clean, tensors["emb_params"], meta), public=True)
        except BaseException:
            target.unlink()  # ours, just written: keep the pair all-or-nothing
            raise
    return target


def read_released(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a released embedding: ``({key: float32 [v, dim]}, header metadata)``.

    Accepts dpagg releases and other single-embedding files (``.safetensors``, or A1111 ``.pt``
    loaded with ``weights_only=True``); refuses dpagg private embedding sets.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DpaggError(f"{path} does not exist; pass a .safetensors embedding file")
    if path.suffix.lower() in (".pt", ".bin"):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DpaggError(f"{path} is not a loadable torch embedding file ({exc})") from exc
        if not isinstance(data, dict) or "string_to_param" not in data:
            raise DpaggError(f"{path} is not an A1111 embedding (no 'string_to_param')")
        param = next(iter(data["string_to_param"].values()))
        rec = data.get("dpagg_record") or {}
        return {"emb_params": param.detach().float()}, {str(k): str(v) for k, v in rec.items()}
    tensors, meta = read_safetensors(path)
    if meta.get(PRIVATE_MARKER) == "true":
        raise DpaggError(f"{path} is a PRIVATE per-image embedding set; load it with load_private")
    return {k: v.float() for k, v in tensors.items()}, meta


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A summary for ``dpagg inspect``: file type, tensor shapes, metadata.

    For a private set only shapes and public metadata are shown, never values.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() == ".safetensors" and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as exc:
            raise DpaggError(f"{path} is not a readable safetensors file ({exc})") from exc
        if meta.get(PRIVATE_MARKER) == "true":
            return {"file": "private embedding set", "tensors": shapes, "metadata": meta}
    vectors, meta = read_released(path)
    kind = "dpagg release" if meta.get("format") == RELEASE_FORMAT else "embedding (not dpagg)"
    out = {
        "file": kind,
        "tensors": {k: list(v.shape) for k, v in vectors.items()},
        "vector_norms": {
            k: [round(float(x), 6) for x in v.norm(dim=-1)] for k, v in vectors.items()
        },
        "metadata": meta,
    }
    usage = how_to_use(path, set(vectors))
    if usage:
        out["use"] = usage
    return out


def how_to_use(path: Path, keys: set[str]) -> dict[str, str]:
    """The prompt / call that loads a released embedding in each consumer. diffusers needs
    ``token=``: without it ``load_textual_inversion`` names the token after the tensor key
    (``emb_params``), so a second file fails with "token already in tokenizer vocabulary".
    Only the file's name appears (no local path: inspect output may be shared)."""
    name, file = path.stem, path.name
    if keys == {"emb_params"}:
        diffusers = f'pipe.load_textual_inversion("{file}", token="{name}")'
    elif keys == {"clip_l", "clip_g"}:
        diffusers = (
            f'state = safetensors.torch.load_file("{file}"); '
            f'pipe.load_textual_inversion(state["clip_l"], token="{name}", '
            "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer); "
            f'pipe.load_textual_inversion(state["clip_g"], token="{name}", '
            "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"
        )
    else:
        return {}
    return {
        "ComfyUI": f"embedding:{name} (in models/embeddings; a space or the prompt start before)",
        "A1111/Forge": f"{name} (in the WebUI's embeddings folder)",
        "diffusers": diffusers + f'; then prompt with "{name}"',
    }
