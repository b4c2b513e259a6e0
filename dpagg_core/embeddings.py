"""Embedding sets (private, per image) and embedding files (released, one per release).

Two very different kinds of data live here:

* :class:`EmbeddingSet` holds the n per-image embeddings ``[n, v, dim]``. They are *private data*
  (docs/privacy.md invariant 4): each row is a function of one private image, so it may leak
  that image.
  They are kept in memory, or with :func:`save_private` in a private file that is marked as such
  and is refused in any folder that prompts read embeddings from.
* A released file (:func:`write_released`) holds ONE noised mean, i.e. the output of the Gaussian
  mechanism, plus its privacy record. Writing it is post-processing of a differentially private
  output, so it costs no budget (post-processing theorem, Dwork & Roth 2014, Prop. 2.1). Its header
  metadata must hold nothing private (invariant 6): only the record (all strings) and
  ``format``. Local paths are refused in the record.

Released file layouts (safetensors; loaded by ComfyUI ``embedding:name``, A1111 and diffusers):

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
must be narrower than ``clip_g`` so the two keys can never be swapped silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import logging
import os
import re
import tempfile
import unicodedata
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DpaggError

logger = logging.getLogger(__name__)

RELEASE_FORMAT = "dpagg-release/1"
PRIVATE_FORMAT = "dpagg-private/2"
_OLD_PRIVATE_FORMATS = ("dpagg-private/1",)
PRIVATE_MARKER = "dpagg_private_embedding_set"

KINDS = ("textual_inversion", "clip_image")
FAMILIES = ("sd1", "sd2", "sdxl", "clip_vision")
# Tensor keys, in the canonical order used by ``flat``/``unflat``, per model family.
KEYS_BY_FAMILY: dict[str, tuple[str, ...]] = {
    "sd1": ("emb_params",),
    "sd2": ("emb_params",),
    "sdxl": ("clip_l", "clip_g"),
    "clip_vision": ("image_embeds",),
}
KIND_OF_FAMILY = {
    "sd1": "textual_inversion",
    "sd2": "textual_inversion",
    "sdxl": "textual_inversion",
    "clip_vision": "clip_image",
}
# CLIP's context is 77 tokens including BOS and EOS.
MAX_TI_VECTORS = 75
MAX_NAME_LEN = 100
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
_PROMPT_FOLDER_NAMES = ("embeddings", "textual_inversion")
_TI_TENSOR_KEYS = ("emb_params", "clip_l", "clip_g", "string_to_param")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {
    f"{p}{i}" for p in ("com", "lpt") for i in "123456789"
}
_TMP_SUFFIX = ".dpagg-tmp"

Vectors = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.array(x, copy=True, order="C"))
    if not isinstance(x, torch.Tensor):
        raise DpaggError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x.detach().to("cpu")


def _check_float32_finite(t: torch.Tensor, what: str) -> None:
    if t.dtype != torch.float32:
        raise DpaggError(
            f"{what} has dtype {t.dtype}; embeddings must be float32 (cast with .float())"
        )
    if t.numel() == 0:
        raise DpaggError(f"{what} is empty (shape {tuple(t.shape)}); it needs at least one value")
    if not bool(torch.isfinite(t).all()):
        raise DpaggError(f"{what} contains NaN or inf; re-run the per-image training for it")


def _checked_centre(
    centre: Any, vectors: Mapping[str, torch.Tensor], owner: str, *, cast: bool = False
) -> dict[str, torch.Tensor]:
    """The public ``centre`` ``{key: [v, dim]}`` of a set whose ``vectors`` are ``[n, v, dim]``,
    validated (exactly the same keys, one embedding's shape, finite float32) and contiguous.
    ``cast``: convert to float32 first instead of refusing another dtype."""
    keys = list(vectors)
    if not isinstance(centre, Mapping) or set(centre) != set(keys):
        raise DpaggError(f"{owner}.centre must have exactly the keys {keys}")
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        c = _as_tensor(centre[key], f"centre[{key!r}]")
        if cast:
            c = c.to(torch.float32)
        if tuple(c.shape) != tuple(vectors[key].shape[1:]):
            raise DpaggError(
                f"centre[{key!r}] has shape {tuple(c.shape)}; it must be "
                f"{tuple(vectors[key].shape[1:])} (one [vectors, dim] embedding)"
            )
        _check_float32_finite(c, f"centre[{key!r}]")
        out[key] = c.contiguous()
    return out


def _family_keys(model_family: str) -> tuple[str, ...]:
    if model_family not in KEYS_BY_FAMILY:
        raise DpaggError(f"model_family={model_family!r} is unknown; use one of {list(FAMILIES)}")
    return KEYS_BY_FAMILY[model_family]


# --------------------------------------------------------------------------------------------
# EmbeddingSet
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class EmbeddingSet:
    """n per-image embeddings of one kind, for one base model. PRIVATE DATA.

    ``vectors[key]`` is float32 ``[n, v, dim]``; keys are exactly those of the released file of
    ``model_family`` (see module docstring). Row i of every key depends only on image i and public
    inputs (invariant 1), which is what makes the mean's replace-one sensitivity ``2C/n`` after
    clipping each row's flattened vector to norm C.

    ``centre`` is a *public* embedding ``[v, dim]`` per key (e.g. the initializer token's
    embedding): the mechanism clips around it, so it must never be computed from the images
    (invariant 2). ``dataset_id`` is the keyed id from :func:`dataset_id_for` (the ledger's
    identity key); the ledger keys budgets on it.
    """

    vectors: dict[str, torch.Tensor]
    kind: str
    model_family: str
    base_model_id: str = ""
    centre: dict[str, torch.Tensor] | None = None
    initializer: str | None = None
    dataset_id: str = ""
    _keys: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DpaggError(f"kind={self.kind!r} is unknown; use one of {list(KINDS)}")
        keys = _family_keys(self.model_family)
        if KIND_OF_FAMILY[self.model_family] != self.kind:
            raise DpaggError(
                f"kind={self.kind!r} does not match model_family={self.model_family!r}; "
                f"that family takes kind={KIND_OF_FAMILY[self.model_family]!r}"
            )
        if not isinstance(self.vectors, Mapping) or set(self.vectors) != set(keys):
            got = sorted(self.vectors) if isinstance(self.vectors, Mapping) else self.vectors
            raise DpaggError(
                f"EmbeddingSet.vectors for {self.model_family} must have exactly the keys "
                f"{list(keys)}, got {got}"
            )
        for name, val in (("base_model_id", self.base_model_id), ("dataset_id", self.dataset_id)):
            if not isinstance(val, str):
                raise DpaggError(f"EmbeddingSet.{name} must be a string, got {type(val).__name__}")
        if self.initializer is not None and not isinstance(self.initializer, str):
            raise DpaggError("EmbeddingSet.initializer must be a string or None")
        vecs: dict[str, torch.Tensor] = {}
        n = v = None
        for key in keys:
            t = _as_tensor(self.vectors[key], f"vectors[{key!r}]")
            if t.dim() != 3:
                raise DpaggError(
                    f"vectors[{key!r}] has shape {tuple(t.shape)}; it must be 3-D [n, vectors, dim]"
                )
            _check_float32_finite(t, f"vectors[{key!r}]")
            if n is None:
                n, v = t.shape[0], t.shape[1]
            elif t.shape[0] != n:
                raise DpaggError(
                    f"vectors[{key!r}] holds {t.shape[0]} images but {keys[0]!r} holds {n}; "
                    "every key needs one row per image"
                )
            elif t.shape[1] != v:
                raise DpaggError(
                    f"vectors[{key!r}] has {t.shape[1]} vectors per image but {keys[0]!r} has {v}"
                )
            vecs[key] = t.contiguous()
        if self.kind == "textual_inversion" and v > MAX_TI_VECTORS:
            raise DpaggError(f"{v} vectors per token do not fit CLIP's 77-token context; use <= 75")
        if self.model_family == "sdxl" and vecs["clip_l"].shape[2] >= vecs["clip_g"].shape[2]:
            raise DpaggError(
                "SDXL 'clip_l' must be narrower than 'clip_g' (768 vs 1280); the keys look swapped"
            )
        self.vectors = vecs
        if self.centre is not None:
            self.centre = _checked_centre(self.centre, vecs, "EmbeddingSet")
        self._keys = keys

    # --- shapes -----------------------------------------------------------------------------

    @property
    def keys(self) -> tuple[str, ...]:
        """Tensor keys in canonical (flattening) order."""
        return self._keys

    @property
    def n(self) -> int:
        return int(self.vectors[self._keys[0]].shape[0])

    @property
    def num_vectors(self) -> int:
        return int(self.vectors[self._keys[0]].shape[1])

    @property
    def encoder_widths(self) -> dict[str, int]:
        """Embedding width per key, e.g. ``{'clip_l': 768, 'clip_g': 1280}``."""
        return {k: int(self.vectors[k].shape[2]) for k in self._keys}

    @property
    def flat_dim(self) -> int:
        """D, the length of one flattened embedding (sum over keys of vectors * width)."""
        return sum(self.num_vectors * w for w in self.encoder_widths.values())

    # --- flattening (what the mechanism works on) -------------------------------------------

    def flat(self) -> np.ndarray:
        """All embeddings as float64 ``[n, D]``, keys concatenated in canonical order.

        The mechanism clips each row of this matrix to L2 norm C: the norm is taken over the whole
        embedding (all keys and vectors), so one image changes at most one row.
        """
        parts = [self.vectors[k].reshape(self.n, -1).double() for k in self._keys]
        return torch.cat(parts, dim=1).numpy().copy()

    def unflat(self, vec: np.ndarray) -> dict[str, torch.Tensor]:
        """Inverse of one row of :meth:`flat`: ``[D]`` -> ``{key: float32 [v, dim]}``."""
        arr = np.asarray(vec, dtype=np.float64)
        if arr.shape != (self.flat_dim,):
            raise DpaggError(
                f"unflat needs a vector of shape ({self.flat_dim},) for this set, got {arr.shape}"
            )
        if not np.isfinite(arr).all():
            raise DpaggError("unflat got NaN or inf values")
        out: dict[str, torch.Tensor] = {}
        start = 0
        for key, width in self.encoder_widths.items():
            size = self.num_vectors * width
            part = arr[start : start + size].reshape(self.num_vectors, width)
            out[key] = torch.from_numpy(part.astype(np.float32))
            start += size
        return out

    def flat_centre(self) -> np.ndarray | None:
        """The public centre flattened like :meth:`flat` (float64 ``[D]``), or None."""
        if self.centre is None:
            return None
        return torch.cat([self.centre[k].reshape(-1).double() for k in self._keys]).numpy().copy()

    def __repr__(self) -> str:
        """Shapes and public labels only: the vectors are private (docs/privacy.md invariant 4),
        and a repr reaches UIs (ComfyUI's Preview Any), logs and tracebacks."""
        shapes = {k: tuple(self.vectors[k].shape) for k in self._keys}
        return (
            f"EmbeddingSet(kind={self.kind!r}, model_family={self.model_family!r}, n={self.n}, "
            f"shapes={shapes}, base_model_id={self.base_model_id!r}, "
            f"centre={'public' if self.centre is not None else None}, "
            f"dataset_id={self.dataset_id!r}; per-image vectors are private and not shown)"
        )

    # --- identity ---------------------------------------------------------------------------

    def _digest(self, h: Any) -> None:
        def put(b: bytes) -> None:
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)

        for s in (self.kind, self.model_family, self.base_model_id, self.dataset_id):
            put(s.encode())
        put(b"\x00" if self.initializer is None else b"\x01" + self.initializer.encode())
        for key in self._keys:
            t = self.vectors[key]
            put(key.encode())
            put(repr(tuple(t.shape)).encode())
            put(t.numpy().astype("<f4", copy=False).tobytes())
        put(b"no-centre" if self.centre is None else b"centre")
        for key in self._keys if self.centre is not None else ():
            put(self.centre[key].numpy().astype("<f4", copy=False).tobytes())

    def content_hash(self, key: bytes) -> str:
        """HMAC-SHA256 under the ledger's identity ``key`` of everything in this set (dataset id,
        model, centre, every vector).

        Keyed like :func:`dataset_id_for`: an unkeyed hash of private vectors would let anyone
        holding a candidate set confirm a guess. It authenticates private files
        (:func:`save_private`): without the key, nobody can relabel or edit a file and have it
        accepted.
        """
        h = hmac.new(_check_key(key), b"dpagg-embedding-set/2", hashlib.sha256)
        self._digest(h)
        return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Dataset id
# --------------------------------------------------------------------------------------------


def _check_key(key: Any) -> bytes:
    if not isinstance(key, bytes) or len(key) != 32:
        raise DpaggError(
            "the identity key must be the 32 bytes of a ledger's key (ledger.identity_key()); "
            f"got {type(key).__name__}"
            + (f" of length {len(key)}" if isinstance(key, (bytes, bytearray)) else "")
        )
    return key


def dataset_id_for(contents: Iterable[bytes], *, key: bytes) -> str:
    """Id of a private image collection: HMAC-SHA256 under the ledger's identity ``key`` of its
    per-image contents (``images.pixel_digest`` of each decoded picture).

    Order-independent (per-image SHA-256 digests are sorted; duplicates count), so renaming or
    re-ordering files keeps the id; editing, adding or removing an image changes it. The ledger
    keys privacy budgets on this id. ``key`` is the ledger's (``ledger.identity_key``): one ledger
    file is one identity space, whichever process, user or data dir computes the id (docs/privacy.md
    invariant 7). Without the key (random, inside the ledger, never released) the id reveals
    nothing about the images: it cannot be used to confirm a guess of the collection.
    """
    if isinstance(contents, (bytes, bytearray, memoryview, str)):
        raise DpaggError("dataset_id_for takes an iterable of per-image byte strings, not one blob")
    digests = []
    for i, c in enumerate(contents):
        if not isinstance(c, (bytes, bytearray, memoryview)):
            raise DpaggError(f"image {i}: dataset_id_for needs raw bytes, got {type(c).__name__}")
        digests.append(hashlib.sha256(c).digest())
    if not digests:
        raise DpaggError("dataset_id_for got no images; the image folder must not be empty")
    digests.sort()
    h = hmac.new(_check_key(key), b"dpagg-dataset/1", hashlib.sha256)
    h.update(len(digests).to_bytes(8, "little"))
    for d in digests:
        h.update(d)
    return "ds-" + h.hexdigest()[:32]


# --------------------------------------------------------------------------------------------
# Atomic, never-overwriting file writes
# --------------------------------------------------------------------------------------------


def _current_umask() -> int:
    """The process umask, read without changing it where possible (/proc on Linux; elsewhere
    the set-and-restore idiom)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _write_new_file(path: Path, data: bytes, *, public: bool = False) -> None:
    """Write ``data`` to ``path`` atomically; fail with DpaggError if ``path`` exists.

    The file is readable by its owner only (0600, the temp file's mode) unless ``public``:
    released embeddings are public by design and get the usual mode (0666 minus the umask),
    like any file the user's tools write; per-image (private) files stay 0600.

    The bytes go to a hidden temp file in the same folder (never ``*.safetensors``/``*.pt``, so
    no loader picks it up), are fsynced, then hard-linked to ``path`` (which fails if ``path``
    exists: no overwrite even in a race) or, where hard links are unsupported, moved with
    ``os.replace`` after an existence check. A crash leaves either no file or the whole file.
    """
    folder = path.parent
    if path.exists() or path.is_symlink():
        raise _exists_error(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem[:40]}.", suffix=_TMP_SUFFIX, dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if public:
                os.fchmod(fh.fileno(), 0o666 & ~_current_umask())
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise _exists_error(path) from None
        except OSError:
            # No hard links here (e.g. FAT, some network shares): check, then rename.
            if path.exists():
                raise _exists_error(path) from None
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _exists_error(path: Path) -> DpaggError:
    return DpaggError(
        f"{path} already exists and dpagg never overwrites a file; choose a new name "
        f"(e.g. {next_free_name(path.parent, path.stem) if _name_ok(path.stem) else 'another'!r})"
    )


def _name_ok(name: str) -> bool:
    try:
        sanitize_name(name)
    except DpaggError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Private on-disk form
# --------------------------------------------------------------------------------------------


def _looks_like_prompt_folder(folder: Path) -> str | None:
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
    from safetensors import safe_open

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


def save_private(eset: EmbeddingSet, path: str | os.PathLike[str], *, key: bytes) -> Path:
    """Save the per-image embeddings to a private ``.safetensors`` file (never overwrites).

    The file is authenticated with the ledger's identity ``key`` (``ledger.identity_key``):
    ``authentication`` is :meth:`EmbeddingSet.content_hash`, an HMAC binding the dataset id, the
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
    why = _looks_like_prompt_folder(folder)
    if why is not None:
        raise DpaggError(
            f"refusing to save private per-image embeddings in {folder}: {why}, so prompts could "
            "load them. Choose a private folder outside models/embeddings (e.g. ~/dpagg-private)"
        )
    tensors = {f"per_image.{k}": eset.vectors[k] for k in eset.keys}
    if eset.centre is not None:
        tensors.update({f"public_centre.{k}": eset.centre[k] for k in eset.keys})
    from . import __version__

    meta = {
        PRIVATE_MARKER: "true",
        "format": PRIVATE_FORMAT,
        "kind": eset.kind,
        "model_family": eset.model_family,
        "base_model_id": eset.base_model_id,
        "dataset_id": eset.dataset_id,
        "n": str(eset.n),
        "authentication": eset.content_hash(key),
        "dpagg_version": __version__,
    }
    if eset.initializer is not None:
        meta["initializer"] = eset.initializer
    import safetensors.torch

    data = safetensors.torch.save(tensors, metadata=meta)
    folder.mkdir(parents=True, exist_ok=True)
    _write_new_file(folder / path.name, data)
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
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise DpaggError(f"{path} does not exist; pass the file written by save_private")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise DpaggError(f"{path} is not a readable safetensors file ({exc})") from exc
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
    if not hmac.compare_digest(eset.content_hash(key), str(meta.get("authentication", ""))):
        raise DpaggError(
            f"{path} failed its authentication check: it was edited or relabelled (e.g. its "
            "dataset_id changed), damaged, or written with another privacy ledger. Nothing was "
            "released. Fix: use the ledger it was written with (--ledger / DPAGG_LEDGER), or "
            "train the per-image embeddings again."
        )
    return eset


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


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


def _is_letter_or_digit(c: str) -> bool:
    cat = unicodedata.category(c)
    return cat.startswith("L") or cat == "Nd"


def _existing_stems(out_dir: Path) -> dict[str, Path]:
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
    taken = _existing_stems(Path(out_dir).expanduser())
    if base.lower() not in taken:
        return base
    for i in range(2, 100_000):
        suffix = f"-{i}"
        cand = base[: MAX_NAME_LEN - len(suffix)].rstrip(".") + suffix
        if cand.lower() not in taken:
            return cand
    raise DpaggError(f"no free name like {base!r} in {out_dir}; choose another name")


# --------------------------------------------------------------------------------------------
# Released files
# --------------------------------------------------------------------------------------------

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
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise DpaggError(f"output folder {out} is a file; pass a folder (models/embeddings)")
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{clean}.safetensors"
    pt_target = out / f"{clean}.pt"
    clash = _existing_stems(out).get(clean.lower())
    if clash is not None:
        raise DpaggError(
            f"an embedding named {clean!r} already exists ({clash}); dpagg never overwrites and "
            f"ComfyUI caches prompts by name: use a new name such as {next_free_name(out, clean)!r}"
        )
    import safetensors.torch

    _write_new_file(target, safetensors.torch.save(tensors, metadata=meta), public=True)
    if a1111_pt:
        try:
            _write_new_file(
                pt_target, _a1111_bytes(clean, tensors["emb_params"], meta), public=True
            )
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
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise DpaggError(f"{path} is not a readable safetensors file ({exc})") from exc
    if meta.get(PRIVATE_MARKER) == "true":
        raise DpaggError(f"{path} is a PRIVATE per-image embedding set; load it with load_private")
    return {k: v.float() for k, v in tensors.items()}, meta


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A summary for ``dpagg inspect``: file type, tensor shapes, metadata.

    For a private set only shapes and public metadata are shown, never values.
    """
    from safetensors import safe_open

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
