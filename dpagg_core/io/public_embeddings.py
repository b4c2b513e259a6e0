"""Per-image embeddings of PUBLIC images: their type, their file and the public-mean centre.

:class:`PublicEmbeddings` (``[n, v, dim]`` per key, a type of its own, never an
``EmbeddingSet``) feeds the public basis builders (``dpagg_core.aggregate.basis_builders``), the
choice of k and C (``dpagg_core.aggregate.basis_choice``) and :func:`public_mean_centre`, the
public centre ``centre='public_mean'`` clips around. Train them with
``dpagg_core.training.public.train_public_embeddings`` on PUBLIC images.

Public inputs only (docs/privacy.md invariants 2 and 8): nothing here accepts the private set
(:func:`refuse_private`), a file marked private is refused, and with a ledger a public file must
carry a valid tag under the ledger's key and no source picture the ledger knows as private
(issue 18 item 3).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpagg_core import __version__
from dpagg_core.errors import DpaggError
from dpagg_core.io.embeddings import (
    PRIVATE_MARKER,
    EmbeddingSet,
    KeyedVectors,
    _as_tensor,
    _check_float32_finite,
    _checked_centre,
    _family_keys,
)
from dpagg_core.io.files import read_safetensors, write_new_file
from dpagg_core.privacy import mechanism
from dpagg_core.privacy.identity import check_identity_key

PUBLIC_FORMAT = "dpagg-public-embeddings/1"
# Header keys of an authenticated public file (issue 18 item 3): the keyed ids of its source
# pictures and an HMAC under the ledger's key over everything in it.
PUBLIC_SOURCES = "source_images"
PUBLIC_TAG = "authentication"
PUBLIC_MARKER = "dpagg_public_embedding_set"


@dataclass(eq=False)
class PublicEmbeddings(KeyedVectors):
    """Per-image TI embeddings of PUBLIC images (``[n, v, dim]`` float32 per key), for building a
    :class:`PublicBasis`. Deliberately not an :class:`EmbeddingSet` (the private type): the basis
    constructor accepts only this type. Build it with ``train_public_embeddings`` on public
    images; building one from private embeddings violates docs/privacy.md invariant 8.

    ``centre``: the public centre ``[v, dim]`` per key (the initializer embedding), the same the
    private release clips around. ``source_ids``: keyed ids of the source pictures under a
    ledger's key (``identity.image_ids_for``), so a release can check that none is private.
    """

    vectors: dict[str, torch.Tensor]
    model_family: str
    base_model_id: str
    centre: dict[str, torch.Tensor]
    initializer: str | None = None
    source_ids: tuple[str, ...] = ()
    _keys: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.vectors, EmbeddingSet):
            raise DpaggError("PublicEmbeddings cannot wrap an EmbeddingSet (private data)")
        keys = _family_keys(self.model_family)
        if not isinstance(self.vectors, Mapping) or set(self.vectors) != set(keys):
            raise DpaggError(
                f"PublicEmbeddings.vectors for {self.model_family} must have exactly the keys "
                f"{list(keys)}"
            )
        if not isinstance(self.base_model_id, str):
            raise DpaggError("PublicEmbeddings.base_model_id must be a string")
        vecs, n, v = {}, None, None
        for key in keys:
            t = _as_tensor(self.vectors[key], f"vectors[{key!r}]").to(torch.float32)
            if t.dim() != 3:
                raise DpaggError(f"vectors[{key!r}] must be [n, v, dim], got {tuple(t.shape)}")
            _check_float32_finite(t, f"vectors[{key!r}]")
            if n is None:
                n, v = int(t.shape[0]), int(t.shape[1])
            elif (int(t.shape[0]), int(t.shape[1])) != (n, v):
                raise DpaggError("every key of PublicEmbeddings needs the same [n, v]")
            vecs[key] = t.contiguous()
        cen = _checked_centre(self.centre, vecs, "PublicEmbeddings", cast=True)
        self.vectors, self.centre, self._keys = vecs, cen, keys
        self.source_ids = tuple(str(i) for i in self.source_ids)


def public_file_tag(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], key: bytes
) -> str:
    """HMAC-SHA256 under a ledger's identity ``key`` of a public embeddings file: its tensors and
    every header field but the tag itself (so the source ids, model and marker are bound). Like
    the private files' tag (``private_file.authentication_tag``): without the key nobody can
    relabel a file (e.g. a private per-image file) as public and have it accepted."""
    h = hmac.new(check_identity_key(key), b"dpagg-public-embeddings/1", hashlib.sha256)

    def put(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    for name in sorted(k for k in meta if k != PUBLIC_TAG):
        put(name.encode())
        put(str(meta[name]).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        put(name.encode())
        put(repr(tuple(t.shape)).encode())
        put(t.numpy().astype("<f4", copy=False).tobytes())
    return h.hexdigest()


def save_public_embeddings(
    public: PublicEmbeddings, path: str | os.PathLike[str], *, key: bytes | None = None
) -> Path:
    """Write PUBLIC per-image embeddings (marked public, never as a prompt-loadable embedding);
    never overwrites. With a ledger's identity ``key`` the file carries the keyed ids of its
    source pictures (``public.source_ids``) and an authentication tag (:func:`public_file_tag`):
    front ends load public files only with a tag valid under their ledger
    (:func:`load_public_embeddings` with ``ledger=``)."""
    import safetensors.torch

    if not isinstance(public, PublicEmbeddings):
        raise DpaggError(f"save_public_embeddings needs PublicEmbeddings, got {type(public)}")
    path = Path(path).expanduser()
    tensors = {f"public.{k}": public.vectors[k] for k in public.keys}
    tensors.update({f"public_centre.{k}": public.centre[k] for k in public.keys})
    meta = {
        PUBLIC_MARKER: "true",
        "format": PUBLIC_FORMAT,
        "model_family": public.model_family,
        "base_model_id": public.base_model_id,
        "n": str(public.n),
        "dpagg_version": __version__,
    }
    if public.initializer is not None:
        meta["initializer"] = public.initializer
    if key is not None:
        meta[PUBLIC_SOURCES] = json.dumps(list(public.source_ids))
        meta[PUBLIC_TAG] = public_file_tag(tensors, meta, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_new_file(path, safetensors.torch.save(tensors, metadata=meta), public=True)
    return path


def read_public_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header of a public file (basis or public embeddings); a file marked
    PRIVATE is refused."""
    if not path.is_file():
        raise DpaggError(f"{path} does not exist")
    tensors, meta = read_safetensors(path)
    if meta.get(PRIVATE_MARKER) == "true":
        raise DpaggError(
            f"{path} is marked PRIVATE (per-image embeddings of private images); a public basis "
            "is never built from private data (docs/privacy.md invariant 8). Train embeddings of "
            "PUBLIC images (`dpagg public-basis --public-images DIR`)."
        )
    return tensors, meta


def load_public_embeddings(path: str | os.PathLike[str], *, ledger: Any = None) -> PublicEmbeddings:
    """Read a file written by :func:`save_public_embeddings`; a file marked private is refused.

    With ``ledger`` (a ``Ledger``: every front end passes its own) the file must be authentic
    under that ledger's key (:func:`public_file_tag`: an edited, relabelled, untagged or
    other-ledger file is refused) and none of its source pictures may be recorded as private
    there (invariant 8). Without it (the project's own shipped public files, benchmarks) the file
    is trusted as public."""
    path = Path(path).expanduser()
    tensors, meta = read_public_safetensors(path)
    if meta.get(PUBLIC_MARKER) != "true" or meta.get("format") != PUBLIC_FORMAT:
        raise DpaggError(f"{path} is not a dpagg PUBLIC embedding set ({PUBLIC_FORMAT})")
    keys = _family_keys(meta.get("model_family", ""))
    try:
        sources = tuple(json.loads(meta.get(PUBLIC_SOURCES, "[]")))
    except ValueError:
        sources = ()
    if ledger is not None:
        _check_public_file(path, tensors, meta, sources, ledger)
    try:
        return PublicEmbeddings(
            vectors={k: tensors[f"public.{k}"] for k in keys},
            model_family=meta["model_family"],
            base_model_id=meta.get("base_model_id", ""),
            centre={k: tensors[f"public_centre.{k}"] for k in keys},
            initializer=meta.get("initializer"),
            source_ids=sources,
        )
    except KeyError as exc:
        raise DpaggError(f"{path} lacks {exc}; the file is damaged") from None


def _check_public_file(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, str],
    sources: Sequence[str],
    ledger: Any,
) -> None:
    rebuild = (
        "Nothing was released. Fix: build it again from PUBLIC pictures with this ledger: "
        f"`dpagg public-basis --kind public_embeddings --public-images DIR --ledger {ledger.path} "
        "--save-public-embeddings FILE ...`."
    )
    tag = meta.get(PUBLIC_TAG)
    if not tag:
        raise DpaggError(
            f"{path} carries no authentication tag (written by an older dpagg or another tool), "
            "so the pictures it was made from cannot be checked against the privacy ledger "
            f"{ledger.path}. {rebuild}"
        )
    if not hmac.compare_digest(public_file_tag(tensors, meta, ledger.identity_key()), tag):
        raise DpaggError(
            f"{path} failed its authentication check: it was edited or relabelled (e.g. a "
            "private per-image file turned into a public one), damaged, or written with another "
            f"privacy ledger than {ledger.path}. {rebuild}"
        )
    private = ledger.private_pictures(list(sources))
    if private:
        raise DpaggError(
            f"{path} was made from {len(sources)} pictures, {len(private)} of which are "
            f"recorded as PRIVATE in the privacy ledger {ledger.path}: a centre or basis from "
            "them is not public (docs/privacy.md invariant 8). " + rebuild
        )


# --------------------------------------------------------------------------------------------
# A public centre: the mean per-image embedding of PUBLIC images (issue 10 part 3)
# --------------------------------------------------------------------------------------------

PUBLIC_MEAN = "public_mean"


@dataclass(frozen=True, eq=False)
class PublicCentre:
    """A public centre to clip around (``centre_kind='public_mean'``): the mean per-image TI
    embedding of PUBLIC images (``[v, dim]`` float32 per key). Build it only with
    :func:`public_mean_centre`, which takes :class:`PublicEmbeddings` (or their file) and refuses
    the private :class:`EmbeddingSet` and any file marked private: the centre, like C, must
    never be computed from the private set (docs/privacy.md invariants 2 and 8).

    Why: the initializer is one token; the mean TI embedding of a style sits elsewhere (on the
    mini model much shorter: ~0.7 vs ~1.4 per vector), so per-image embeddings are far from the
    initializer and need a large C; around a public mean of similar public images they are
    closer, so a smaller public C clips as little, and the noise (proportional to C) shrinks.
    ``sha256`` (:func:`mechanism.centre_hash` of :meth:`flat`) is written into the record as
    ``centre_sha256``.
    """

    vectors: Mapping[str, torch.Tensor]
    model_family: str
    base_model_id: str
    n_public: int
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.vectors, EmbeddingSet):
            raise DpaggError("PublicCentre cannot wrap an EmbeddingSet (private data)")
        keys = _family_keys(self.model_family)
        if not isinstance(self.vectors, Mapping) or set(self.vectors) != set(keys):
            raise DpaggError(f"PublicCentre.vectors needs exactly the keys {list(keys)}")
        vecs = {}
        for key in keys:
            t = _as_tensor(self.vectors[key], f"vectors[{key!r}]").to(torch.float32)
            if t.dim() != 2:
                raise DpaggError(f"vectors[{key!r}] must be [v, dim], got {tuple(t.shape)}")
            _check_float32_finite(t, f"vectors[{key!r}]")
            vecs[key] = t.contiguous()
        if len({int(t.shape[0]) for t in vecs.values()}) != 1:
            raise DpaggError("every key of PublicCentre needs the same number of vectors")
        object.__setattr__(self, "vectors", vecs)
        object.__setattr__(self, "sha256", mechanism.centre_hash(self.flat()))

    @property
    def kind(self) -> str:
        return PUBLIC_MEAN

    @property
    def num_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    def flat(self) -> np.ndarray:
        """float64 ``[D]`` in :meth:`EmbeddingSet.flat` order (keys canonical, ``[v, dim]``)."""
        keys = _family_keys(self.model_family)
        return np.concatenate([self.vectors[k].double().reshape(-1).numpy() for k in keys])


def public_mean_centre(public: Any, *, ledger: Any = None) -> PublicCentre:
    """The mean per-image embedding of PUBLIC images as a :class:`PublicCentre`.

    ``public``: :class:`PublicEmbeddings` or a file written by :func:`save_public_embeddings`.
    Refused (DpaggError): an :class:`EmbeddingSet` (private per-image embeddings), a file marked
    private, anything else. The mean is computed in float64 and stored as float32."""
    if isinstance(public, EmbeddingSet):
        raise DpaggError(
            "public_mean_centre refuses an EmbeddingSet: it holds PRIVATE per-image embeddings, "
            "and a centre computed from the private set is not public (docs/privacy.md "
            "invariant 2). Use PublicEmbeddings of PUBLIC images (train_public_embeddings)."
        )
    if isinstance(public, (str, os.PathLike)):
        public = load_public_embeddings(public, ledger=ledger)
    elif ledger is not None and isinstance(public, PublicEmbeddings) and public.source_ids:
        private = ledger.private_pictures(list(public.source_ids))
        if private:
            raise DpaggError(
                f"{len(private)} of the {len(public.source_ids)} source pictures of these public "
                f"embeddings are recorded as PRIVATE in the privacy ledger {ledger.path}; a "
                "centre from them is not public (docs/privacy.md invariant 8). Nothing was "
                "released. Fix: train the public embeddings from PUBLIC pictures only."
            )
    if not isinstance(public, PublicEmbeddings):
        raise DpaggError(
            "public_mean_centre takes PublicEmbeddings (train_public_embeddings on PUBLIC images) "
            f"or their file, got {type(public).__name__}"
        )
    return PublicCentre(
        vectors={k: public.vectors[k].double().mean(0).float() for k in public.keys},
        model_family=public.model_family,
        base_model_id=public.base_model_id,
        n_public=public.n,
    )


def refuse_private(x: Any, who: str) -> None:
    if isinstance(x, EmbeddingSet):
        raise DpaggError(
            f"{who} refuses an EmbeddingSet: it holds PRIVATE per-image embeddings, and the basis "
            "must come from public data only (docs/privacy.md invariant 8). Use the model's "
            "token table, or PublicEmbeddings of PUBLIC images (train_public_embeddings)."
        )
