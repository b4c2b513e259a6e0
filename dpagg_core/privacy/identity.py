"""Identity of private pictures and image sets under a ledger's key (docs/privacy.md, "Identity").

Every value here is keyed by the ledger's 32-byte identity key (HMAC-SHA256), so one ledger file
is one identity space (invariant 7) and nothing stored reveals a picture to anyone without the
key: an unkeyed hash of a picture would let a reader of the ledger confirm a guess.

* :func:`image_id_for`: one picture (its ``images.pixel_digest``: decoded full-size 8-bit RGB and
  size). The ledger charges every release to each of its pictures by this id (invariant 9).
* :func:`dataset_id_for`: an image set, order-independent; a display name and the key of a set's
  record (the budget still lives with each picture).
* :func:`fingerprint`: the public id of a model from its weights (``base_model_id``); unkeyed.
* :func:`look_id_for`: a public perceptual hash of a picture (:func:`perceptual_hash`), keyed. It
  matches a resized or re-encoded copy of a recorded picture where the exact digest does not; the
  ledger uses it only to warn (two different pictures may share it, a heavily edited copy won't).

Pure functions: nothing here opens the ledger or decodes files.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from dpagg_core.errors import DpaggError

KEY_BYTES = 32
IMAGE_ID_PREFIX = "im-"
DATASET_ID_PREFIX = "ds-"
# A set recorded before the ledger knew its pictures (schema <= 2, or a trusted caller's id) is
# charged as one unit named like this until its pictures are registered (Ledger.register_set).
SET_UNIT_PREFIX = "set:"


def check_identity_key(key: Any) -> bytes:
    """``key`` if it is a ledger's 32-byte identity key (``ledger.identity_key()``); else
    DpaggError. Everything keyed by it (dataset ids, private-file tags) checks it first."""
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise DpaggError(
            "the identity key must be the 32 bytes of a ledger's key (ledger.identity_key()); "
            f"got {type(key).__name__}"
            + (f" of length {len(key)}" if isinstance(key, (bytes, bytearray)) else "")
        )
    return key


def _digests(contents: Iterable[bytes], who: str) -> list[bytes]:
    if isinstance(contents, (bytes, bytearray, memoryview, str)):
        raise DpaggError(f"{who} takes an iterable of per-image byte strings, not one blob")
    out = []
    for i, c in enumerate(contents):
        if not isinstance(c, (bytes, bytearray, memoryview)):
            raise DpaggError(f"image {i}: {who} needs raw bytes, got {type(c).__name__}")
        out.append(hashlib.sha256(c).digest())
    if not out:
        raise DpaggError(f"{who} got no images; the image folder must not be empty")
    return out


def dataset_id_for(contents: Iterable[bytes], *, key: bytes) -> str:
    """Id of a private image collection: HMAC-SHA256 under the ledger's identity ``key`` of its
    per-image contents (``images.pixel_digest`` of each decoded picture).

    Order-independent (per-image SHA-256 digests are sorted; duplicates count), so renaming or
    re-ordering files keeps the id; editing, adding or removing an image changes it. Without the
    key (random, inside the ledger, never released) the id reveals nothing about the images. The
    format is unchanged since schema 1, so recorded sets keep their ids.
    """
    digests = sorted(_digests(contents, "dataset_id_for"))
    h = hmac.new(check_identity_key(key), b"dpagg-dataset/1", hashlib.sha256)
    h.update(len(digests).to_bytes(8, "little"))
    for d in digests:
        h.update(d)
    return DATASET_ID_PREFIX + h.hexdigest()[:32]


def image_ids_for(contents: Iterable[bytes], *, key: bytes) -> list[str]:
    """Per-picture ids (same order as ``contents``): HMAC-SHA256 under ``key`` of each picture's
    ``pixel_digest``, 128 bits. The unit the ledger charges (invariant 9)."""
    secret = check_identity_key(key)
    return [
        IMAGE_ID_PREFIX + hmac.new(secret, b"dpagg-image/1" + d, hashlib.sha256).hexdigest()[:32]
        for d in _digests(contents, "image_ids_for")
    ]


def perceptual_hash(gray: np.ndarray) -> bytes:
    """A 64-bit difference hash (dHash) from a picture reduced to gray ``[8, 9]`` (box filter;
    ``images.look_of`` makes it): one bit per horizontal neighbour pair, brighter or not. Public
    and simple on purpose: it survives re-encoding, resizing and mild colour changes, not crops
    or edits. Hand-written (a few lines) because the PyPI packages that do it pull in scipy/pywt
    or OpenCV for one function."""
    small = np.asarray(gray, dtype=np.float64)
    if small.shape != (8, 9):
        raise DpaggError(f"perceptual_hash needs a [8, 9] gray thumbnail, got shape {small.shape}")
    bits = (small[:, 1:] > small[:, :-1]).astype(np.uint8).reshape(-1)
    return np.packbits(bits).tobytes()


def look_id_for(perceptual: bytes, *, key: bytes) -> str:
    """The stored form of a :func:`perceptual_hash`: keyed like every other value, so the ledger
    never holds the raw hash (which would let a reader test a guessed picture)."""
    return hmac.new(
        check_identity_key(key), b"dpagg-look/1" + bytes(perceptual), hashlib.sha256
    ).hexdigest()[:32]


def set_unit(dataset_id: str) -> str:
    """The charge unit of a set whose pictures the ledger does not know (module docs)."""
    return SET_UNIT_PREFIX + dataset_id


def fingerprint(
    tensors: Sequence[Any], *, rows: int | None = None, samples: int | None = None
) -> str:
    """First 16 hex digits of sha256 over ``tensors`` (shape, then float16 little-endian bytes).

    Rounding to float16 makes the id independent of the dtype the weights were loaded in.
    ``rows`` keeps only the first rows of each tensor (the base vocabulary of an embedding table);
    ``samples`` only that many evenly spaced values of each (flattened) tensor, which tells
    large models apart without hashing gigabytes (the shape is hashed in full either way).

    A model's public id (``base_model_id``), not keyed: the same weights give the same id under
    every ledger. ``torch`` is imported here, not at the top, so the ledger and its worker
    processes, which import this module, do not load it.
    """
    import torch

    h = hashlib.sha256()
    for t in tensors:
        t = t.detach()
        if rows is not None:
            t = t[:rows]
        if samples is not None:
            flat = t.reshape(-1)
            last = max(flat.numel() - 1, 0)
            idx = torch.linspace(0, last, min(samples, flat.numel())).long().clamp_(0, last)
            h.update(repr(tuple(t.shape)).encode())
            t = flat[idx.to(flat.device)]
        t = t.to(device="cpu", dtype=torch.float16).contiguous()
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.view(torch.int16).numpy().astype("<i2", copy=False).tobytes())
    return h.hexdigest()[:16]
