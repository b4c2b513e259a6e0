"""Aggregation in a PUBLIC subspace: project, clip, average and add noise in k coordinates.

Why (issue 10). The Gaussian mean mechanism adds noise of std ``sigma = z * 2C/n`` to every one of
the D coordinates of an embedding, so the noise has norm about ``sigma * sqrt(D)`` while the
signal (the centred mean) has norm at most C. With 10-50 images and D = 768 (SD1), 1024 (SD2),
768 + 1280 (SDXL) per vector, nothing private is usable at epsilon <= 4. If the centred
per-image embeddings lie (mostly) in a known K-dimensional subspace, aggregating in that
subspace costs noise of norm ``sigma * sqrt(K)`` instead, at the same epsilon.

Mechanism (:func:`dp_mean_projected`)
------------------------------------
``U`` is a D x K matrix with orthonormal columns, computed from PUBLIC data only
(:class:`PublicBasis`; docs/privacy.md invariants 2 and 8). For per-image embeddings ``x_i`` and
the public centre ``c``:

1. ``y_i = U^T (x_i - c)`` (K coordinates; a fixed public linear map of one item);
2. :func:`dpagg_core.privacy.mechanism.dp_mean` on the ``y_i``: each clipped to norm ``C`` IN THE
   SUBSPACE, the secret subsample, the public denominator, CSPRNG Gaussian noise of std
   ``plan.noise_std(C)`` on each of the K coordinates, published at float32;
3. ``release = c + U * noisy`` (float64, then rounded to float32).

Privacy: step 1 maps each item on its own, so replacing one image still changes one ``y_i``; after
clipping ``||y_i|| <= C`` the mean's replace-one sensitivity is ``2C/n`` (``2C/m``, ``2C/(qn)``),
exactly as in the full space, so the plan and the accountant are unchanged. Step 3 is
post-processing of a DP output with public ``U`` and ``c`` (Dwork & Roth 2014, Prop. 2.1).
Clipping in the subspace never clips more than clipping in the full space
(``||U^T v|| <= ||v||``). What the projection costs is bias: the part of the true mean outside
``span(U)`` is lost. ``bench/subspace_gain.py`` measures the trade-off.

The public basis
----------------
:class:`PublicBasis` holds ``U`` over the flattened item in :meth:`EmbeddingSet.flat` order
(keys in canonical order, each ``[v, dim]`` row-major). Design choices:

* **Per vector, block-diagonal.** Each of the v vectors of a TI embedding is a token embedding
  of the same text encoder, living in that encoder's token space. The basis is therefore one
  ``dim x k`` block per encoder, shared by all v vectors: ``U = blockdiag(B, ..., B)`` (v times)
  per key, so ``K = v * k`` per key. Why: the token table (kind ``token_table``) is a basis of ONE
  token's space, so it can only act per vector; for ``public_embeddings`` pooling the v vectors of
  every public image gives v times more samples for the PCA, which matters with the 10-50 public
  images a user has (a joint PCA over ``v * dim`` from n public images has rank < n). A joint
  basis could also capture correlations between the vectors; we found no need on the mini model.
* **SDXL: each encoder in its own subspace** (``clip_l`` and ``clip_g`` each get k directions of
  their own width). The two token spaces are different spaces (768 vs 1280 wide, different
  scales); a joint PCA of the concatenated rows would be dominated by the higher-variance table.
  The clip norm still acts on the whole projected embedding (both keys together), so the
  sensitivity is unchanged.
* ``k`` (directions per vector per encoder) is a public parameter; the noise is added on
  ``K = basis.dim = v * k * (number of keys)`` coordinates.

Two kinds:

* ``token_table``: the top-k principal directions of the text encoder's own token-embedding table
  (rows 0..49407, the CLIP BPE vocabulary; it ships with the model, so it is public), CENTRED on
  the table mean by default: a TI embedding starts at the initializer token and moves towards
  other tokens' directions; the difference of two tokens has mean zero and covariance twice the
  table's centred covariance, so the centred principal directions are where token differences
  live (the uncentred ones would spend a direction on the table's mean offset, which cancels in
  a difference). ``token_ids`` restricts the PCA to a public list of tokens (e.g. a model's
  known vocabulary).
* ``public_embeddings``: the top-k principal directions of per-image TI embeddings of PUBLIC
  images (:class:`PublicEmbeddings`, trained through the same ``dpagg_core.training.ti`` code,
  e.g. by ``dpagg public-basis --public-images DIR``), of their deltas from the public centre (all v
  vectors of every image pooled), CENTRED on their mean by default. ``centred=False`` (the
  second moment around the public centre, which keeps the public mean delta as a direction)
  was expected to do better for a mean, but measured slightly worse: on the mini model, k = 8,
  cosine to the non-private mean 0.34 / 0.51 / 0.68 (centred) vs 0.31 / 0.47 / 0.63 at n = 25,
  epsilon 1 / 2 / 4 (``bench/subspace_gain.py``, public styles only; standard error ~0.03).

``typical_norms`` (per key) is a public number the post-processing may rescale to
(``dpagg_core.aggregate.postprocess``): the median row norm of the table (``token_table``), or, for
``public_embeddings``, the median over the v vectors of the norm of the public embeddings' MEAN:
the release estimates a mean, and a mean of TI embeddings is much shorter than one embedding
(mini model: ~0.7 vs ~1.4 per vector); rescaling to single-embedding norms gave about 3x the
squared error there (n = 25, one run of the bench's data).

Public inputs only (invariant 8): :meth:`PublicBasis.from_token_table` takes a token table (at
least 49408 rows, its ``base_model_id`` is computed from it), :meth:`PublicBasis.from_public_
embeddings` takes only a :class:`PublicEmbeddings` (or a file written by
:func:`save_public_embeddings`) and refuses an :class:`EmbeddingSet` (the private per-image
set) and any file marked private. No function here accepts the private set.

Reproducibility: ``sha256`` hashes U's bytes (float64 little-endian, C order, preceded by its
shape); the privacy record names the kind, k, K and this hash, so an auditor holding the basis
file (:func:`save_basis`) can check which U a release used. Recomputing a basis on another
machine can differ in the last bits of the eigenvectors (BLAS), hence in the hash: share the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
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
from dpagg_core.io.names import looks_like_prompt_folder
from dpagg_core.privacy import mechanism
from dpagg_core.privacy.accountant import PrivacyPlan

log = logging.getLogger(__name__)

MECHANISM = "dpagg-gaussian-mean-subspace"
KINDS: tuple[str, ...] = ("token_table", "public_embeddings")
STRUCTURE = "per-vector"
BASIS_FORMAT = "dpagg-public-basis/1"
BASIS_MARKER = "dpagg_public_basis"
PUBLIC_FORMAT = "dpagg-public-embeddings/1"
# Header keys of an authenticated public file (issue 18 item 3): the keyed ids of its source
# pictures and an HMAC under the ledger's key over everything in it.
PUBLIC_SOURCES = "source_images"
PUBLIC_TAG = "authentication"
PUBLIC_MARKER = "dpagg_public_embedding_set"
BASE_VOCAB_ROWS = 49408  # = models.BASE_VOCAB_ROWS (CLIP BPE vocabulary), without importing models
# Columns must be orthonormal to this tolerance (a PCA gives ~1e-15).
_ORTHO_TOL = 1e-9
_CHUNK = 8192


# --------------------------------------------------------------------------------------------
# Public per-image embeddings (of PUBLIC images): a type of its own, never an EmbeddingSet
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class PublicEmbeddings(KeyedVectors):
    """Per-image TI embeddings of PUBLIC images (``[n, v, dim]`` float32 per key), for building a
    :class:`PublicBasis`. Deliberately not an :class:`EmbeddingSet` (the private type): the basis
    constructor accepts only this type. Build it with :func:`train_public_embeddings` on public
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


def train_public_embeddings(
    backend: Any,
    images: torch.Tensor,
    config: Any,
    *,
    progress: Any = None,
) -> PublicEmbeddings:
    """Per-image TI of PUBLIC ``images`` (``[N, 3, H, W]`` in ``[-1, 1]``) through the same
    ``dpagg_core.training.ti.train_vectors`` loop the private sets use (same model, initializer,
    vectors, steps), returned as :class:`PublicEmbeddings`. Pass only images you may publish."""
    from dpagg_core.training.ti import train_vectors

    vectors, centre = train_vectors(backend, images, config, progress=progress)
    return PublicEmbeddings(
        vectors={k: t.to(torch.float32) for k, t in vectors.items()},
        model_family=backend.model_family,
        base_model_id=backend.base_model_id or "",
        centre=centre,
        initializer=config.initializer,
    )


def public_file_tag(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], key: bytes
) -> str:
    """HMAC-SHA256 under a ledger's identity ``key`` of a public embeddings file: its tensors and
    every header field but the tag itself (so the source ids, model and marker are bound). Like
    the private files' tag (``private_file.authentication_tag``): without the key nobody can
    relabel a file (e.g. a private per-image file) as public and have it accepted."""
    import hmac

    from dpagg_core.privacy.identity import check_identity_key

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


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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
    tensors, meta = _read_safetensors(path)
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
    import hmac

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


# --------------------------------------------------------------------------------------------
# PCA helpers
# --------------------------------------------------------------------------------------------


def _second_moment(rows: Any, centred: bool) -> tuple[np.ndarray, int]:
    """float64 ``dim x dim`` (co)variance of the rows (torch or numpy, any float dtype), in
    chunks so a 49408 x 1280 table never needs a float64 copy; two passes when centred."""
    n, dim = int(rows.shape[0]), int(rows.shape[1])

    def chunk(i: int) -> np.ndarray:
        part = rows[i : i + _CHUNK]
        if isinstance(part, torch.Tensor):
            part = part.detach().to("cpu", torch.float64).numpy()
        return np.asarray(part, dtype=np.float64)

    mean = np.zeros(dim)
    if centred:
        for i in range(0, n, _CHUNK):
            mean += chunk(i).sum(axis=0)
        mean /= n
    m = np.zeros((dim, dim))
    for i in range(0, n, _CHUNK):
        x = chunk(i) - mean
        m += x.T @ x
    return m / n, n


def _top_directions(moment: np.ndarray, k: int, what: str) -> np.ndarray:
    """Top-k eigenvectors (descending eigenvalue) of a symmetric PSD matrix, signs fixed so the
    largest-magnitude entry of each column is positive (a deterministic choice)."""
    dim = moment.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= dim:
        raise DpaggError(f"k={k!r}; pass an integer in [1, {dim}] (directions per vector).")
    vals, vecs = np.linalg.eigh((moment + moment.T) / 2.0)
    order = np.argsort(vals)[::-1][:k]
    vals, vecs = vals[order], vecs[:, order]
    top = float(vals[0]) if vals.size else 0.0
    if not top > 0 or vals[-1] <= top * 1e-12:
        raise DpaggError(
            f"{what} has fewer than k={k} non-degenerate principal directions (rank too small); "
            "choose a smaller k or more public rows."
        )
    idx = np.argmax(np.abs(vecs), axis=0)
    signs = np.sign(vecs[idx, np.arange(vecs.shape[1])])
    return np.ascontiguousarray(vecs * signs)


def _refuse_private(x: Any, who: str) -> None:
    if isinstance(x, EmbeddingSet):
        raise DpaggError(
            f"{who} refuses an EmbeddingSet: it holds PRIVATE per-image embeddings, and the basis "
            "must come from public data only (docs/privacy.md invariant 8). Use the model's "
            "token table, or PublicEmbeddings of PUBLIC images (train_public_embeddings)."
        )


# --------------------------------------------------------------------------------------------
# The basis
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PublicBasis:
    """A public orthonormal basis U (float64 ``[D, K]``) over the flattened embedding item.

    ``blocks[key]`` is the per-vector basis of that encoder (float64 ``[dim, k]``, orthonormal
    columns); ``U`` is block-diagonal: for each key in canonical order, ``vectors`` copies of its
    block (module docstring: why per vector, why one subspace per SDXL encoder). ``k`` is the
    number of directions per vector per key, ``dim`` = K the number of noised coordinates.
    Build with :meth:`from_token_table` or :meth:`from_public_embeddings`; read/write with
    :func:`load_basis` / :func:`save_basis`.
    """

    blocks: Mapping[str, np.ndarray]
    vectors: int
    kind: str
    model_family: str
    base_model_id: str
    centred: bool
    typical_norms: Mapping[str, float]
    rows: int  # public rows (tokens, or public vectors) the PCA used
    U: np.ndarray = field(init=False, repr=False)
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        keys = _family_keys(self.model_family)
        if self.kind not in KINDS:
            raise DpaggError(f"basis kind={self.kind!r}; use one of {list(KINDS)}")
        if not isinstance(self.blocks, Mapping) or set(self.blocks) != set(keys):
            raise DpaggError(f"basis blocks for {self.model_family} need exactly keys {keys}")
        v = self.vectors
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 75:
            raise DpaggError(f"vectors={v!r}; pass the embedding's vectors per token (1-75).")
        if not isinstance(self.base_model_id, str):
            raise DpaggError("base_model_id must be a string")
        mechanism._check_record_text(
            self.base_model_id, "base_model_id", mechanism._RECORD_TEXT, allow_empty=True
        )
        blocks: dict[str, np.ndarray] = {}
        ks = set()
        for key in keys:
            b = np.array(self.blocks[key], dtype=np.float64, copy=True)
            if b.ndim != 2 or b.shape[1] < 1 or b.shape[1] > b.shape[0]:
                raise DpaggError(f"basis block {key!r} has shape {b.shape}; expected [dim, k<=dim]")
            if not np.isfinite(b).all():
                raise DpaggError(f"basis block {key!r} contains NaN or inf")
            err = np.abs(b.T @ b - np.eye(b.shape[1])).max()
            if err > _ORTHO_TOL:
                raise DpaggError(
                    f"basis block {key!r} is not orthonormal (max |B^T B - I| = {err:.2e})"
                )
            b.setflags(write=False)
            blocks[key] = b
            ks.add(b.shape[1])
        if len(ks) != 1:
            raise DpaggError(f"every key needs the same k, got {sorted(ks)}")
        norms = {}
        for key in keys:
            value = float(dict(self.typical_norms).get(key, float("nan")))
            if not math.isfinite(value) or value <= 0:
                raise DpaggError(f"typical_norms[{key!r}] must be a positive number")
            norms[key] = value
        d = sum(int(v) * blocks[key].shape[0] for key in keys)
        kk = sum(int(v) * blocks[key].shape[1] for key in keys)
        u = np.zeros((d, kk))
        r = c = 0
        for key in keys:
            b = blocks[key]
            for _ in range(int(v)):
                u[r : r + b.shape[0], c : c + b.shape[1]] = b
                r, c = r + b.shape[0], c + b.shape[1]
        u.setflags(write=False)
        set_ = object.__setattr__
        set_(self, "blocks", blocks)
        set_(self, "vectors", int(v))
        set_(self, "centred", bool(self.centred))
        set_(self, "typical_norms", norms)
        set_(self, "rows", int(self.rows))
        set_(self, "U", u)
        set_(self, "sha256", basis_hash(u))

    # --- shape ------------------------------------------------------------------------------

    @property
    def keys(self) -> tuple[str, ...]:
        return _family_keys(self.model_family)

    @property
    def k(self) -> int:
        """Directions per vector per encoder key (the public parameter ``--k``)."""
        return int(next(iter(self.blocks.values())).shape[1])

    @property
    def dim(self) -> int:
        """K: the number of coordinates the noise is added to (``vectors * k * keys``)."""
        return int(self.U.shape[1])

    @property
    def flat_dim(self) -> int:
        """D: the length of the flattened embedding this basis acts on."""
        return int(self.U.shape[0])

    @property
    def widths(self) -> dict[str, int]:
        return {key: int(b.shape[0]) for key, b in self.blocks.items()}

    def record(self) -> dict[str, str]:
        """The basis' public fields for a privacy record (strings)."""
        return {
            "basis_kind": self.kind,
            "basis_k": str(self.k),
            "basis_dim": str(self.dim),
            "basis_structure": STRUCTURE,
            "basis_centred": "true" if self.centred else "false",
            "basis_rows": str(self.rows),
            "basis_sha256": self.sha256,
        }

    # --- maps -------------------------------------------------------------------------------

    def project(self, deltas: Any) -> np.ndarray:
        """``[n, D]`` (or ``[D]``) centred items -> their K coordinates ``deltas @ U``."""
        return np.asarray(deltas, dtype=np.float64) @ self.U

    def lift(self, coords: Any) -> np.ndarray:
        """K coordinates -> the D-space vector ``U @ coords`` (post-processing)."""
        return self.U @ np.asarray(coords, dtype=np.float64)

    # --- constructors (public inputs only) --------------------------------------------------

    @classmethod
    def from_token_table(
        cls,
        table: Any,
        k: int,
        *,
        vectors: int = 1,
        centred: bool = True,
        token_ids: Sequence[int] | None = None,
        model_family: str | None = None,
        base_model_id: str | None = None,
    ) -> PublicBasis:
        """The top-k principal directions of the model's token-embedding table (kind
        ``token_table``), centred on the table mean unless ``centred=False`` (module docstring).

        ``table``: a text encoder (``get_input_embeddings()``) or its weight ``[rows, dim]``
        (torch or numpy); SDXL: a mapping ``{'clip_l': ..., 'clip_g': ...}`` (or a sequence of the
        two). Only rows 0..49407 (the CLIP BPE vocabulary) are used, or ``token_ids`` among them;
        the ``base_model_id`` is computed from the tables exactly as ``dpagg_core.training.models``
        does, so a basis always names the model it belongs to; a backend that names models its own
        way (the ComfyUI node backend: ``comfyui:<family>:<hash>``) passes its id for the same model
        as ``base_model_id``. ``model_family`` defaults to ``sdxl`` for two tables, else ``sd2`` for
        1024-wide, else ``sd1``.
        """
        from dpagg_core.training.models import fingerprint

        _refuse_private(table, "from_token_table")
        if isinstance(table, PublicEmbeddings):
            raise DpaggError("from_token_table got PublicEmbeddings; use from_public_embeddings")
        if isinstance(table, Mapping):
            if set(table) == {"clip_l", "clip_g"}:
                tables = [table["clip_l"], table["clip_g"]]
            elif len(table) == 1:
                tables = list(table.values())
            else:
                raise DpaggError(f"table keys {sorted(table)}: pass one table or clip_l + clip_g")
        elif isinstance(table, (list, tuple)):
            tables = list(table)
        else:
            tables = [table]
        mats = []
        for t in tables:
            _refuse_private(t, "from_token_table")
            if hasattr(t, "get_input_embeddings"):
                t = t.get_input_embeddings().weight
            if isinstance(t, np.ndarray):
                t = torch.from_numpy(np.ascontiguousarray(t))
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
                raise DpaggError(
                    "from_token_table needs a text encoder or its token-embedding table "
                    f"[rows, dim] (float), got {type(t).__name__}"
                )
            if t.shape[0] < BASE_VOCAB_ROWS:
                raise DpaggError(
                    f"token table has {t.shape[0]} rows; a Stable Diffusion text encoder's table "
                    f"has >= {BASE_VOCAB_ROWS} (the CLIP vocabulary). Pass the model's table."
                )
            mats.append(t.detach())
        if len(mats) == 2:
            family = model_family or "sdxl"
        elif len(mats) == 1:
            family = model_family or ("sd2" if mats[0].shape[1] == 1024 else "sd1")
        else:
            raise DpaggError(f"got {len(mats)} token tables; pass 1 (SD1/SD2) or 2 (SDXL)")
        keys = _family_keys(family)
        if len(keys) != len(mats) or family == "clip_vision":
            raise DpaggError(f"model_family={family!r} does not take {len(mats)} token table(s)")
        if base_model_id is None:
            base_model_id = fingerprint(mats, rows=BASE_VOCAB_ROWS)
        ids = None
        if token_ids is not None:
            ids = sorted({int(i) for i in token_ids})
            if not ids or ids[0] < 0 or ids[-1] >= BASE_VOCAB_ROWS:
                raise DpaggError(f"token_ids must be non-empty ids in [0, {BASE_VOCAB_ROWS})")
        blocks, norms, rows = {}, {}, 0
        for key, t in zip(keys, mats, strict=True):
            used = t[:BASE_VOCAB_ROWS] if ids is None else t[ids]
            moment, rows = _second_moment(used, centred)
            blocks[key] = _top_directions(moment, k, f"the {key} token table")
            row_norms = torch.linalg.vector_norm(used.to(torch.float64), dim=1).numpy()
            norms[key] = float(np.median(row_norms))
        return cls(
            blocks=blocks,
            vectors=vectors,
            kind="token_table",
            model_family=family,
            base_model_id=base_model_id,
            centred=centred,
            typical_norms=norms,
            rows=rows,
        )

    @classmethod
    def from_public_embeddings(cls, public: Any, k: int, *, centred: bool = True) -> PublicBasis:
        """The top-k principal directions of PUBLIC per-image TI embeddings' deltas from their
        public centre (kind ``public_embeddings``; all v vectors of every image pooled, per key),
        centred on their mean unless ``centred=False`` (then: the second moment around the public
        centre). ``typical_norms``: the median over the v vectors of the norm of the public
        embeddings' mean (module docstring).

        ``public``: :class:`PublicEmbeddings` or a file written by
        :func:`save_public_embeddings`. An :class:`EmbeddingSet` (private) or a file marked
        private is refused with a DpaggError (docs/privacy.md invariant 8).
        """
        _refuse_private(public, "from_public_embeddings")
        if isinstance(public, (str, os.PathLike)):
            public = load_public_embeddings(public)
        if not isinstance(public, PublicEmbeddings):
            raise DpaggError(
                "from_public_embeddings takes PublicEmbeddings (train_public_embeddings on PUBLIC "
                f"images) or their file, got {type(public).__name__}"
            )
        blocks, norms, rows = {}, {}, 0
        for key in public.keys:
            x = public.vectors[key].double()
            deltas = (x - public.centre[key].double()).reshape(-1, x.shape[-1])
            moment, rows = _second_moment(deltas, centred)
            blocks[key] = _top_directions(moment, k, f"the public {key} embeddings")
            norms[key] = float(np.median(torch.linalg.vector_norm(x.mean(0), dim=1).numpy()))
        return cls(
            blocks=blocks,
            vectors=public.num_vectors,
            kind="public_embeddings",
            model_family=public.model_family,
            base_model_id=public.base_model_id,
            centred=centred,
            typical_norms=norms,
            rows=rows,
        )


def basis_hash(u: np.ndarray) -> str:
    """sha256 (hex) of U's bytes: its shape (two little-endian int64) then its values as
    float64 little-endian, C order."""
    arr = np.ascontiguousarray(np.asarray(u, dtype="<f8"))
    h = hashlib.sha256()
    h.update(np.asarray(arr.shape, dtype="<i8").tobytes())
    h.update(arr.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Choosing k on PUBLIC styles only (leave one public style out)
# --------------------------------------------------------------------------------------------

DEFAULT_MIN_COS = 0.95


@dataclass(frozen=True)
class KChoice:
    """The result of :func:`choose_k`.

    ``k``: the chosen directions per vector; ``met``: whether ``k`` reached ``min_cos`` (False:
    no candidate did, ``k`` is the one with the largest mean cosine); ``rows``: one dict per
    candidate (ascending k) with ``k``, ``cos_min`` (worst held-out cosine), ``cos_mean`` and
    ``usable`` (False, cosines None: some fit could not support k, see ``why``);
    ``groups``: the number of public styles.
    """

    k: int
    met: bool
    min_cos: float
    rows: tuple[dict[str, Any], ...]
    groups: int = 0


def auto_k_candidates(width: int) -> tuple[int, ...]:
    """The candidates of ``--k auto``: 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, ... (x1.5, x4/3
    alternately past 16), those <= ``width`` (the vector width); ``(width,)`` if width < 4."""
    width = int(width)
    if width < 1:
        raise DpaggError(f"vector width {width} must be positive")
    out, k = [4, 8, 12], 16
    while k <= width:
        out.append(k)
        out.append(k * 3 // 2)
        k *= 2
    kept = tuple(sorted({c for c in out if c <= width}))
    return kept or (width,)


def choose_k(
    public: Any,
    groups: Sequence[Any] | np.ndarray,
    ks: Sequence[int],
    *,
    min_cos: float = DEFAULT_MIN_COS,
) -> KChoice:
    """Choose the basis size k from PUBLIC embeddings only, leaving one public style out.

    Rule (the one ``bench/choose_public_defaults.py`` used to pick the benchmark's k): for every
    public style (group) g, fit :meth:`PublicBasis.from_public_embeddings` with k directions on
    the embeddings of the OTHER styles' images, take g's mean embedding delta
    ``d = mean_i(x_i) - centre`` (its images, around ``public.centre``) and the cosine between
    ``d`` and its projection ``U U^T d``. A k's score is its MEAN cosine over the held-out
    styles (the worst is reported too: with many public styles one outlier would decide it). The
    choice is the smallest k in ``ks`` whose mean cosine is ``>= min_cos`` (``met=True``); if
    none reaches it, the k with the largest mean cosine (smallest such k on a tie;
    ``met=False``). A k that some fit cannot support (fewer non-degenerate directions than k:
    ``from_public_embeddings`` raises) is not usable. Held-out styles stand in for the unknown
    private style: too small a k drops the part of a new style's mean outside the subspace,
    too large a k adds noise on more coordinates (module docstring).

    Privacy: k is a public parameter of the release (it sets K, the number of noised
    coordinates, and is written into the privacy record). It is computed here from PUBLIC
    images' embeddings (``public``: :class:`PublicEmbeddings` or a file written by
    :func:`save_public_embeddings`) and their public style labels only; nothing private enters
    (docs/privacy.md invariants 2 and 8). An :class:`EmbeddingSet` (private per-image embeddings)
    or a file marked private is refused, exactly as by :meth:`PublicBasis.from_public_embeddings`.
    Choosing k on the private set would make k (and the basis) depend on the private images.

    ``groups[i]``: the public style label of image i (``len(groups) == public.n``); at least 3
    distinct styles are needed (each fit then still has >= 2). Deterministic: the same inputs
    give the same choice.
    """
    _refuse_private(public, "choose_k")
    if isinstance(public, (str, os.PathLike)):
        public = load_public_embeddings(public)
    if not isinstance(public, PublicEmbeddings):
        raise DpaggError(
            "choose_k takes PublicEmbeddings (train_public_embeddings on PUBLIC images) or their "
            f"file, got {type(public).__name__}"
        )
    labels = np.asarray(groups)
    if labels.ndim != 1 or labels.shape[0] != public.n:
        raise DpaggError(
            f"groups needs one style label per public image ({public.n}), got shape "
            f"{tuple(labels.shape)}"
        )
    names, codes = np.unique(labels, return_inverse=True)
    if len(names) < 3:
        raise DpaggError(
            f"choosing k needs PUBLIC images of at least 3 styles (got {len(names)}): each style "
            "is held out in turn and the basis is fitted on the others. Put the public images in "
            ">= 3 subfolders, one per style, or pass an explicit --k K."
        )
    try:
        min_cos = float(min_cos)
    except (TypeError, ValueError):
        raise DpaggError(f"min_cos={min_cos!r} must be a number in (-1, 1]") from None
    if not -1.0 < min_cos <= 1.0:
        raise DpaggError(f"min_cos={min_cos!r} must be a number in (-1, 1]")
    cands = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise DpaggError(f"candidate k={k!r} must be a positive integer")
        cands.append(int(k))
    cands = sorted(set(cands))
    if not cands:
        raise DpaggError("choose_k needs at least one candidate k")

    cos: dict[int, list[float]] = {k: [] for k in cands}
    why: dict[int, str] = {}
    flat, centre = public.flat(), public.flat_centre()
    for g in range(len(names)):
        rest = np.flatnonzero(codes != g)
        fit = PublicEmbeddings(
            vectors={key: public.vectors[key][torch.from_numpy(rest)] for key in public.keys},
            model_family=public.model_family,
            base_model_id=public.base_model_id,
            centre=public.centre,
            initializer=public.initializer,
        )
        d = flat[codes == g].mean(axis=0) - centre  # the held-out style's mean delta, [D]
        dn = float(np.linalg.norm(d))
        for k in cands:
            if k in why:
                continue
            try:
                basis = PublicBasis.from_public_embeddings(fit, k)
            except DpaggError as exc:
                why[k] = f"holding out style {names[g]!s}: {exc}"
                continue
            p = basis.lift(basis.project(d))
            pn = float(np.linalg.norm(p))
            # a held-out mean at the centre loses nothing; a projection of 0 keeps nothing
            c = 1.0 if dn == 0.0 else (0.0 if pn == 0.0 else float(d @ p) / (dn * pn))
            cos[k].append(c)
    rows = []
    for k in cands:
        if k in why:
            rows.append({"k": k, "cos_min": None, "cos_mean": None, "usable": False, "why": why[k]})
        else:
            c = np.asarray(cos[k])
            rows.append(
                {"k": k, "cos_min": float(c.min()), "cos_mean": float(c.mean()), "usable": True}
            )
    usable = [r for r in rows if r["usable"]]
    if not usable:
        raise DpaggError(
            f"no candidate k in {cands} can be fitted with one public style left out "
            f"({rows[0]['why']}); add public images or pass a smaller --k"
        )
    ok = [r for r in usable if r["cos_mean"] >= min_cos]
    if ok:
        chosen, met = ok[0], True
    else:
        chosen, met = max(usable, key=lambda r: (r["cos_mean"], -r["k"])), False
    return KChoice(
        k=int(chosen["k"]), met=met, min_cos=min_cos, rows=tuple(rows), groups=len(names)
    )


# --------------------------------------------------------------------------------------------
# Basis files
# --------------------------------------------------------------------------------------------


def subspace_clip_norms(public: Any, basis: PublicBasis, quantile: float = 0.5) -> dict[str, float]:
    """The clip norm C for a release in ``basis``'s subspace, from PUBLIC embeddings only: the
    ``quantile`` of ``||U^T (x_i - c)||`` over the public images, around the initializer centre
    they were trained from (``initializer``) and around their own mean (``public_mean``, the
    centre ``centre='public_mean'`` clips around). The clipping happens in the K coordinates, so
    this, not the full-space distance, is the C to pass with ``--basis``. ``bench/
    reproduce_paper.py`` uses the median (``quantile=0.5``). Refuses private input (invariant 2).
    """
    _refuse_private(public, "subspace_clip_norms")
    if isinstance(public, (str, os.PathLike)):
        public = load_public_embeddings(public)
    if not isinstance(public, PublicEmbeddings):
        raise DpaggError(
            f"subspace_clip_norms takes PublicEmbeddings or their file, got {type(public).__name__}"
        )
    if not 0.0 < float(quantile) <= 1.0:
        raise DpaggError(f"quantile={quantile!r}: pass a number in (0, 1]")
    flat = public.flat()
    check_basis(basis, flat_dim=flat.shape[1], base_model_id=public.base_model_id)
    out = {}
    for kind, centre in (("initializer", public.flat_centre()), ("public_mean", flat.mean(axis=0))):
        norms = np.linalg.norm(basis.project(flat - centre), axis=1)
        out[kind] = float(np.quantile(norms, quantile))
    return out


def save_basis(basis: PublicBasis, path: str | os.PathLike[str]) -> Path:
    """Write ``basis`` as a safetensors file (never overwrites): tensors ``basis.<key>``
    (float64 ``[dim, k]`` per-vector blocks), header marked as a PUBLIC basis with its kind, k,
    vectors, model and sha256 of the full U."""
    import safetensors.torch

    if not isinstance(basis, PublicBasis):
        raise DpaggError(f"save_basis needs a PublicBasis, got {type(basis).__name__}")
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise DpaggError(f"{path}: save the basis as .safetensors (e.g. mybasis.basis.safetensors)")
    why = looks_like_prompt_folder(path.resolve().parent)
    if why is not None:  # a prompt loader would list it as an embedding
        raise DpaggError(f"refusing to save a basis in {path.parent}: {why}; choose another folder")
    tensors = {f"basis.{k}": torch.from_numpy(np.array(b)) for k, b in basis.blocks.items()}
    meta = {
        BASIS_MARKER: "true",
        "format": BASIS_FORMAT,
        "public": "true",
        "kind": basis.kind,
        "k": str(basis.k),
        "dim": str(basis.dim),
        "vectors": str(basis.vectors),
        "structure": STRUCTURE,
        "centred": "true" if basis.centred else "false",
        "rows": str(basis.rows),
        "model_family": basis.model_family,
        "base_model_id": basis.base_model_id,
        "typical_norms": json.dumps(basis.typical_norms, sort_keys=True),
        "sha256": basis.sha256,
        "dpagg_version": __version__,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_new_file(path, safetensors.torch.save(tensors, metadata=meta), public=True)
    return path


def load_basis(path: str | os.PathLike[str]) -> PublicBasis:
    """Read a basis file (:func:`save_basis`). Refused: a file marked private, a file that is not
    a dpagg public basis, or one whose U no longer matches its recorded sha256 (edited)."""
    path = Path(path).expanduser()
    tensors, meta = _read_safetensors(path)
    if meta.get(BASIS_MARKER) != "true" or meta.get("format") != BASIS_FORMAT:
        raise DpaggError(f"{path} is not a dpagg public basis file ({BASIS_FORMAT})")
    try:
        keys = _family_keys(meta["model_family"])
        basis = PublicBasis(
            blocks={k: tensors[f"basis.{k}"].double().numpy() for k in keys},
            vectors=int(meta["vectors"]),
            kind=meta["kind"],
            model_family=meta["model_family"],
            base_model_id=meta.get("base_model_id", ""),
            centred=meta.get("centred") == "true",
            typical_norms=json.loads(meta["typical_norms"]),
            rows=int(meta.get("rows", "0")),
        )
    except (KeyError, ValueError) as exc:
        raise DpaggError(f"{path} is a damaged basis file ({exc})") from None
    if basis.sha256 != meta.get("sha256"):
        raise DpaggError(f"{path}: U does not match its recorded sha256; the file was altered")
    return basis


# --------------------------------------------------------------------------------------------
# The projected mechanism
# --------------------------------------------------------------------------------------------


def check_basis(
    basis: Any,
    *,
    flat_dim: int,
    base_model_id: str,
    model_family: str | None = None,
    vectors: int | None = None,
) -> PublicBasis:
    """Refuse a basis that does not fit the embeddings: not a :class:`PublicBasis`, another D,
    another base model (or family). Errors name both sides. Draws nothing."""
    if not isinstance(basis, PublicBasis):
        raise DpaggError(
            "basis must be a dpagg_core.aggregate.subspace.PublicBasis (load_basis / "
            f"from_token_table / from_public_embeddings), got {type(basis).__name__}"
        )
    if model_family is not None and basis.model_family != model_family:
        raise DpaggError(
            f"the basis is for model family {basis.model_family!r} but the embeddings are "
            f"{model_family!r}; build the basis from the same model (`dpagg public-basis`)"
        )
    if basis.base_model_id != base_model_id:
        raise DpaggError(
            f"the basis belongs to base model {basis.base_model_id!r} but the embeddings were "
            f"trained on {base_model_id!r}; build the basis from the same model"
        )
    if basis.flat_dim != int(flat_dim):
        more = (
            f" (the basis is for {basis.vectors} vector(s) per token; the embeddings have "
            f"{vectors}: rebuild it with --vectors {vectors})"
            if vectors is not None and vectors != basis.vectors
            else ""
        )
        raise DpaggError(
            f"the basis acts on D={basis.flat_dim} values but each embedding has "
            f"D={int(flat_dim)}{more}"
        )
    return basis


def privacy_record(
    plan: PrivacyPlan,
    clip_norm: float,
    basis: PublicBasis,
    *,
    mode: str = "clip",
    centre_kind: str = "origin",
    base_model_id: str = "",
) -> dict[str, str]:
    """The public record of a projected release: ``mechanism.privacy_record`` with mechanism
    ``dpagg-gaussian-mean-subspace`` and the basis fields (kind, k, K, structure, sha256)."""
    record = mechanism.privacy_record(
        plan, clip_norm, mode=mode, centre_kind=centre_kind, base_model_id=base_model_id
    )
    record["mechanism"] = MECHANISM
    record.update(basis.record())
    return record


def dp_mean_projected(
    vectors: Any,
    *,
    plan: PrivacyPlan,
    clip_norm: float,
    basis: PublicBasis,
    center: Any = None,
    mode: str = "clip",
    base_model_id: str = "",
    centre_kind: str = "origin",
) -> mechanism.Release:
    """One DP release of the mean of ``vectors`` ([n, D]) in the public subspace of ``basis``.

    ``y_i = U^T (x_i - center)``; :func:`mechanism.dp_mean` on the ``y_i`` (clip to ``clip_norm``
    in the subspace, secret subsample, public denominator, CSPRNG noise of std
    ``plan.noise_std(clip_norm)`` per coordinate, float32 publication); then
    ``center + U @ noisy`` (post-processing), rounded to float32. Same sensitivity and plan as
    :func:`mechanism.dp_mean` (module docstring). Validates everything (and the basis against
    D and ``base_model_id``) before any randomness is drawn.
    """
    arr, cen = mechanism.check_inputs(
        vectors, plan, clip_norm, center, mode=mode, centre_kind=centre_kind
    )
    item_shape = arr.shape[1:]
    rows = arr.reshape(arr.shape[0], -1)
    check_basis(basis, flat_dim=rows.shape[1], base_model_id=base_model_id)
    record = privacy_record(
        plan,
        clip_norm,
        basis,
        mode=mode,
        centre_kind=centre_kind,
        base_model_id=base_model_id,
    )
    if centre_kind in mechanism.HASHED_CENTRES and cen is not None:
        record["centre_sha256"] = mechanism.centre_hash(cen)
    if cen is not None:
        rows = rows - cen.reshape(1, -1)
    coords = basis.project(rows)  # [n, K]: each item mapped on its own (public linear map)
    noisy = mechanism.dp_mean(coords, plan=plan, clip_norm=clip_norm, mode=mode).vector
    out = basis.lift(noisy)
    if cen is not None:
        out = out + cen.reshape(-1)
    return mechanism.Release(
        vector=mechanism.to_published_precision(out).reshape(item_shape), record=record
    )
