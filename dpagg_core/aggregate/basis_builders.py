"""Public bases from public data: the token table or public embeddings (PCA), and their files.

The value type, its check and hash and the projected DP mean live in
``dpagg_core.privacy.basis``; this module builds a :class:`PublicBasis` from PUBLIC inputs only
and reads/writes basis files. ``PublicBasis.from_token_table`` / ``from_public_embeddings`` of
earlier versions are :func:`basis_from_token_table` / :func:`basis_from_public_embeddings`.

Design choices
--------------
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
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpagg_core import __version__
from dpagg_core.errors import DpaggError
from dpagg_core.io.embeddings import _family_keys
from dpagg_core.io.files import write_new_file
from dpagg_core.io.names import looks_like_prompt_folder
from dpagg_core.io.public_embeddings import (
    PublicEmbeddings,
    load_public_embeddings,
    read_public_safetensors,
    refuse_private,
)
from dpagg_core.privacy.basis import STRUCTURE, PublicBasis
from dpagg_core.privacy.identity import fingerprint

BASIS_FORMAT = "dpagg-public-basis/1"
BASIS_MARKER = "dpagg_public_basis"
BASE_VOCAB_ROWS = 49408  # = models.BASE_VOCAB_ROWS (CLIP BPE vocabulary), without importing models
_CHUNK = 8192


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


def basis_from_token_table(
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
    does (``models.base_model_id_of``: the one id of the CLI, the WebUI and the ComfyUI nodes),
    so a basis always names the model it belongs to; ``base_model_id`` overrides it (a caller
    that already has the model's id). ``model_family`` defaults to ``sdxl``
    for two tables, else ``sd2`` for 1024-wide, else ``sd1``.
    """
    refuse_private(table, "from_token_table")
    if isinstance(table, PublicEmbeddings):
        raise DpaggError("from_token_table got PublicEmbeddings; use basis_from_public_embeddings")
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
        refuse_private(t, "from_token_table")
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
    return PublicBasis(
        blocks=blocks,
        vectors=vectors,
        kind="token_table",
        model_family=family,
        base_model_id=base_model_id,
        centred=centred,
        typical_norms=norms,
        rows=rows,
    )


def basis_from_public_embeddings(public: Any, k: int, *, centred: bool = True) -> PublicBasis:
    """The top-k principal directions of PUBLIC per-image TI embeddings' deltas from their
    public centre (kind ``public_embeddings``; all v vectors of every image pooled, per key),
    centred on their mean unless ``centred=False`` (then: the second moment around the public
    centre). ``typical_norms``: the median over the v vectors of the norm of the public
    embeddings' mean (module docstring).

    ``public``: :class:`PublicEmbeddings` or a file written by
    :func:`save_public_embeddings`. An :class:`EmbeddingSet` (private) or a file marked
    private is refused with a DpaggError (docs/privacy.md invariant 8).
    """
    refuse_private(public, "from_public_embeddings")
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
    return PublicBasis(
        blocks=blocks,
        vectors=public.num_vectors,
        kind="public_embeddings",
        model_family=public.model_family,
        base_model_id=public.base_model_id,
        centred=centred,
        typical_norms=norms,
        rows=rows,
    )


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
    tensors, meta = read_public_safetensors(path)
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
