"""Embedding names and the folders prompts load embeddings from.

A released embedding is selected in a prompt by its file name (ComfyUI ``embedding:<name>``,
A1111 ``<name>``), so a name must be a plain file name that also survives prompt syntax
(:func:`sanitize_name`), and a new release needs a name no embedding in the folder uses yet
(:func:`next_free_name`: ComfyUI caches prompt encodings by prompt text). Private per-image files
and public bases must never land in a folder a prompt loader lists
(:func:`looks_like_prompt_folder`).
"""

from __future__ import annotations

import os
import unicodedata
import zipfile
from pathlib import Path

from safetensors import safe_open

from dpagg_core.errors import DpaggError
from dpagg_core.io.embeddings import PRIVATE_MARKER

MAX_NAME_LEN = 100
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
_PROMPT_FOLDER_NAMES = ("embeddings", "textual_inversion")
_TI_TENSOR_KEYS = ("emb_params", "clip_l", "clip_g", "string_to_param")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {
    f"{p}{i}" for p in ("com", "lpt") for i in "123456789"
}


def sanitize_name(name: str) -> str:
    """Check an embedding name; returns it stripped (and without a ``.safetensors``/``.pt`` end).

    Allowed: letters, digits and ``- _ .`` (no leading dot, no ``..``, at most 100 characters),
    so the name is a plain file name in the output folder and works as ``embedding:<name>`` in a
    ComfyUI prompt (which splits on spaces and treats ``( ) :`` as weighting syntax).
    """
    if not isinstance(name, str):
        raise DpaggError(f"embedding name must be a string, got {type(name).__name__}")
    hint = "use letters, digits, '-', '_' and '.' only, e.g. 'mystyle' or 'my_style-2'"
    clean = unicodedata.normalize("NFC", name.strip())
    for suffix in EMBEDDING_SUFFIXES:
        if clean.lower().endswith(suffix) and len(clean) > len(suffix):
            clean = clean[: -len(suffix)]
            break
    if not clean:
        raise DpaggError(f"embedding name {name!r} is empty; {hint}")
    if len(clean) > MAX_NAME_LEN:
        raise DpaggError(f"embedding name is {len(clean)} characters; use at most {MAX_NAME_LEN}")
    if any(unicodedata.category(c).startswith("C") for c in clean):
        raise DpaggError(f"embedding name {name!r} contains control characters; {hint}")
    if "/" in clean or "\\" in clean or os.sep in clean or (os.altsep and os.altsep in clean):
        raise DpaggError(f"embedding name {name!r} contains a path separator; {hint}")
    if ".." in clean:
        raise DpaggError(f"embedding name {name!r} contains '..'; {hint}")
    if clean.startswith("."):
        raise DpaggError(f"embedding name {name!r} starts with a dot (hidden file); {hint}")
    if clean.endswith("."):
        raise DpaggError(f"embedding name {name!r} ends with a dot; {hint}")
    bad = sorted({c for c in clean if not (_is_letter_or_digit(c) or c in "-_.")})
    if bad:
        raise DpaggError(f"embedding name {name!r} contains {''.join(bad)!r}; {hint}")
    if clean.split(".")[0].lower() in _WINDOWS_RESERVED:
        raise DpaggError(f"embedding name {name!r} is a reserved device name on Windows; {hint}")
    return clean


def name_ok(name: str) -> bool:
    """Whether :func:`sanitize_name` accepts ``name``."""
    try:
        sanitize_name(name)
    except DpaggError:
        return False
    return True


def _is_letter_or_digit(c: str) -> bool:
    cat = unicodedata.category(c)
    return cat.startswith("L") or cat == "Nd"


def existing_stems(out_dir: Path) -> dict[str, Path]:
    """Lower-cased names of embeddings under ``out_dir`` (ComfyUI also searches sub-folders)."""
    stems: dict[str, Path] = {}
    if not out_dir.is_dir():
        return stems
    for root, _dirs, files in os.walk(out_dir):
        for f in files:
            low = f.lower()
            for suffix in EMBEDDING_SUFFIXES:
                if low.endswith(suffix):
                    stems.setdefault(low[: -len(suffix)], Path(root) / f)
            stems.setdefault(low, Path(root) / f)
    return stems


def next_free_name(out_dir: str | os.PathLike[str], name: str) -> str:
    """First of ``name``, ``name-2``, ``name-3``, ... that no embedding under ``out_dir`` uses.

    ComfyUI caches prompt encodings by prompt text, so a new release needs a new
    ``embedding:<name>``; comparison is case-insensitive and includes sub-folders (ComfyUI
    resolves ``embedding:x`` in any of them).
    """
    base = sanitize_name(name)
    taken = existing_stems(Path(out_dir).expanduser())
    if base.lower() not in taken:
        return base
    for i in range(2, 100_000):
        suffix = f"-{i}"
        cand = base[: MAX_NAME_LEN - len(suffix)].rstrip(".") + suffix
        if cand.lower() not in taken:
            return cand
    raise DpaggError(f"no free name like {base!r} in {out_dir}; choose another name")


# --------------------------------------------------------------------------------------------
# Folders prompts load embeddings from
# --------------------------------------------------------------------------------------------


def looks_like_prompt_folder(folder: Path) -> str | None:
    """Why ``folder`` looks like a folder prompts load embeddings from (or None)."""
    for part in folder.parts:
        if part.lower() in _PROMPT_FOLDER_NAMES:
            return f"its path has a folder named {part!r}"
    if not folder.is_dir():
        return None
    for i, entry in enumerate(os.scandir(folder)):
        if i >= 2000:
            break
        if not entry.is_file():
            continue
        low = entry.name.lower()
        if low.endswith(".safetensors") and _safetensors_is_embedding(Path(entry.path)):
            return f"it holds the embedding file {entry.name!r}"
        if low.endswith((".pt", ".bin")) and _pickle_is_embedding(Path(entry.path)):
            return f"it holds the embedding file {entry.name!r}"
    return None


def _safetensors_is_embedding(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
    except Exception:
        return False
    if meta.get("format", "").startswith("dpagg-release"):
        return True
    return bool(keys & set(_TI_TENSOR_KEYS)) and meta.get(PRIVATE_MARKER) != "true"


def _pickle_is_embedding(path: Path) -> bool:
    """Look for TI markers in a torch file WITHOUT unpickling it (no code runs)."""
    needles = tuple(k.encode() for k in _TI_TENSOR_KEYS)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if info.filename.endswith("data.pkl") and info.file_size < (4 << 20):
                        blob = zf.read(info)
                        return any(n in blob for n in needles)
            return False
        with open(path, "rb") as fh:
            blob = fh.read(1 << 20)
        return any(n in blob for n in needles)
    except Exception:
        return False
