"""The private on-disk form of an :class:`~dpagg_core.io.embeddings.EmbeddingSet` (PRIVATE DATA).

:func:`save_private` writes the n per-image embeddings to a ``.safetensors`` file marked private
and authenticated with the ledger's identity key; :func:`load_private` reads it back and refuses
an edited, relabelled or foreign-ledger copy. Such a file is refused in any folder prompts read
embeddings from (docs/privacy.md invariant 4).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path
from typing import Any

from dpagg_core import __version__
from dpagg_core.errors import DpaggError
from dpagg_core.io.embeddings import PRIVATE_MARKER, EmbeddingSet, _family_keys
from dpagg_core.io.files import read_safetensors, write_new_file
from dpagg_core.io.images import check_identity_key
from dpagg_core.io.names import looks_like_prompt_folder

logger = logging.getLogger(__name__)

PRIVATE_FORMAT = "dpagg-private/2"
_OLD_PRIVATE_FORMATS = ("dpagg-private/1",)


def _digest(eset: EmbeddingSet, h: Any) -> None:
    def put(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    for s in (eset.kind, eset.model_family, eset.base_model_id, eset.dataset_id):
        put(s.encode())
    put(b"\x00" if eset.initializer is None else b"\x01" + eset.initializer.encode())
    for key in eset.keys:
        t = eset.vectors[key]
        put(key.encode())
        put(repr(tuple(t.shape)).encode())
        put(t.numpy().astype("<f4", copy=False).tobytes())
    put(b"no-centre" if eset.centre is None else b"centre")
    for key in eset.keys if eset.centre is not None else ():
        put(eset.centre[key].numpy().astype("<f4", copy=False).tobytes())


def authentication_tag(eset: EmbeddingSet, key: bytes) -> str:
    """HMAC-SHA256 under the ledger's identity ``key`` of everything in ``eset`` (dataset id,
    model, centre, every vector).

    Keyed like :func:`~dpagg_core.io.images.dataset_id_for`: an unkeyed hash of private vectors
    would let anyone holding a candidate set confirm a guess. It authenticates private files
    (:func:`save_private`): without the key, nobody can relabel or edit a file and have it
    accepted.
    """
    h = hmac.new(check_identity_key(key), b"dpagg-embedding-set/2", hashlib.sha256)
    _digest(eset, h)
    return h.hexdigest()


def save_private(eset: EmbeddingSet, path: str | os.PathLike[str], *, key: bytes) -> Path:
    """Save the per-image embeddings to a private ``.safetensors`` file (never overwrites).

    The file is authenticated with the ledger's identity ``key`` (``ledger.identity_key``):
    ``authentication`` is :func:`authentication_tag`, an HMAC binding the dataset id, the
    model, the public centre and every vector, so :func:`load_private` refuses a copy whose
    dataset id was changed (which would otherwise get a fresh budget) or whose contents were
    edited. It does not stop someone who holds the ledger file (and so the key), or who retrains
    from the images under another ledger (a different ledger is a separate budget by design).

    PRIVATE DATA (invariant 4). Refused when the folder looks like one prompts load embeddings
    from (a path component ``embeddings`` or ``textual_inversion``, or a folder already holding
    embedding files), so that no UI can ever list or load it as an embedding. The file carries
    ``dpagg_private_embedding_set: true`` and stores tensors as ``per_image.<key>`` ``[n, v, dim]``
    (+ ``public_centre.<key>``), so ComfyUI, A1111 and diffusers all fail to read it as one.
    """
    if not isinstance(eset, EmbeddingSet):
        raise DpaggError(f"save_private needs an EmbeddingSet, got {type(eset).__name__}")
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise DpaggError(
            f"{path}: private embedding sets are saved as .safetensors; "
            "use a name like 'mystyle.private.safetensors' in a private folder"
        )
    folder = path.resolve().parent
    why = looks_like_prompt_folder(folder)
    if why is not None:
        raise DpaggError(
            f"refusing to save private per-image embeddings in {folder}: {why}, so prompts could "
            "load them. Choose a private folder outside models/embeddings (e.g. ~/dpagg-private)"
        )
    tensors = {f"per_image.{k}": eset.vectors[k] for k in eset.keys}
    if eset.centre is not None:
        tensors.update({f"public_centre.{k}": eset.centre[k] for k in eset.keys})
    meta = {
        PRIVATE_MARKER: "true",
        "format": PRIVATE_FORMAT,
        "kind": eset.kind,
        "model_family": eset.model_family,
        "base_model_id": eset.base_model_id,
        "dataset_id": eset.dataset_id,
        "n": str(eset.n),
        "authentication": authentication_tag(eset, key),
        "dpagg_version": __version__,
    }
    if eset.initializer is not None:
        meta["initializer"] = eset.initializer
    import safetensors.torch

    data = safetensors.torch.save(tensors, metadata=meta)
    folder.mkdir(parents=True, exist_ok=True)
    write_new_file(folder / path.name, data)
    logger.warning(
        "Saved %d per-image embeddings to %s. They are PRIVATE data (each can reveal its image): "
        "keep this file out of models/embeddings, shared folders and backups you publish.",
        eset.n,
        folder / path.name,
    )
    return folder / path.name


def load_private(path: str | os.PathLike[str], *, key: bytes) -> EmbeddingSet:
    """Load a file written by :func:`save_private` with the same ledger ``key`` (checks marker,
    shapes and the authentication tag; an edited, relabelled or foreign-ledger file is refused)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DpaggError(f"{path} does not exist; pass the file written by save_private")
    tensors, meta = read_safetensors(path)
    if meta.get(PRIVATE_MARKER) == "true" and meta.get("format") in _OLD_PRIVATE_FORMATS:
        raise DpaggError(
            f"{path} was written by an older dpagg ({meta.get('format')}) without an "
            "authentication tag, so its dataset id cannot be trusted (a relabelled copy would get "
            "a fresh privacy budget). Fix: train the per-image embeddings again with this dpagg "
            "(dpagg train / run --keep-private-embeddings)."
        )
    if meta.get(PRIVATE_MARKER) != "true" or meta.get("format") != PRIVATE_FORMAT:
        raise DpaggError(
            f"{path} is not a dpagg private embedding set (no {PRIVATE_MARKER!r} marker); "
            "released embeddings are read with read_released"
        )
    family = meta.get("model_family", "")
    keys = _family_keys(family)
    try:
        vectors = {k: tensors[f"per_image.{k}"] for k in keys}
    except KeyError as exc:
        raise DpaggError(f"{path} lacks tensor {exc}; the file is damaged") from None
    centre = None
    if any(k.startswith("public_centre.") for k in tensors):
        centre = {k: tensors[f"public_centre.{k}"] for k in keys}
    eset = EmbeddingSet(
        vectors=vectors,
        kind=meta.get("kind", ""),
        model_family=family,
        base_model_id=meta.get("base_model_id", ""),
        centre=centre,
        initializer=meta.get("initializer"),
        dataset_id=meta.get("dataset_id", ""),
    )
    if not hmac.compare_digest(authentication_tag(eset, key), str(meta.get("authentication", ""))):
        raise DpaggError(
            f"{path} failed its authentication check: it was edited or relabelled (e.g. its "
            "dataset_id changed), damaged, or written with another privacy ledger. Nothing was "
            "released. Fix: use the ledger it was written with (--ledger / DPAGG_LEDGER), or "
            "train the per-image embeddings again."
        )
    return eset
