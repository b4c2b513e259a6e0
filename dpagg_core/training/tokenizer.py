"""The real CLIP BPE tokenizer, built offline from the vocabulary shipped in PyPI ``clip-anytorch``.

No hub access: the merges file ``bpe_simple_vocab_16e6.txt.gz`` is located with
``importlib.util.find_spec("clip")`` (or ``"open_clip"``, which ships the same file; neither
package is imported, ``clip`` would pull torchvision) and turned into a
``transformers.CLIPTokenizer`` with the same 49408-token vocabulary
as Stable Diffusion's text encoders. Inside ComfyUI no extra package is needed: its own SD1
tokenizer files (``comfy/sd1_tokenizer/vocab.json`` + ``merges.txt``, the same vocabulary) are used
when neither package is installed.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from dpagg_core.errors import DpaggError

CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


# Packages that ship the same CLIP BPE file: clip-anytorch / OpenAI CLIP (``clip``), and
# open-clip-torch (``open_clip``, which the Stable Diffusion WebUIs install).
BPE_PROVIDERS = ("clip", "open_clip")
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def comfyui_tokenizer_dir() -> Path | None:
    """ComfyUI's SD1 tokenizer folder when ComfyUI's ``comfy`` package is importable."""
    spec = importlib.util.find_spec("comfy")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "sd1_tokenizer"
    ok = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    return folder if ok else None


def clip_bpe_path() -> Path:
    for name in BPE_PROVIDERS:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
        if path.is_file():
            return path
    raise DpaggError(
        "the CLIP vocabulary is missing: install it with `pip install --no-deps clip-anytorch` "
        "(inside ComfyUI's environment none is needed)"
    )


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    try:
        path = clip_bpe_path()
    except DpaggError:
        folder = comfyui_tokenizer_dir()
        if folder is None:
            raise
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [m for m in lines[1:] if m.strip()]
        assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
        return vocab, merges
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == CLIP_VOCAB_SIZE
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(model_max_length: int = 77):
    """A fresh ``CLIPTokenizer`` (callers may add placeholder tokens to it)."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m.split()) for m in merges],
        model_max_length=model_max_length,
        pad_token="<|endoftext|>",
    )
