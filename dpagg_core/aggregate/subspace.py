"""Aggregation in a PUBLIC subspace: compatibility names for the modules it was split into.

Earlier versions kept five jobs in this one module (issue 19 item 4). They now live by job, each
importing only the layers below it (``tests/test_layers.py``):

* ``dpagg_core.privacy.basis``: the value type :class:`PublicBasis`, :func:`check_basis`,
  :func:`basis_hash`, the projected DP mean :func:`dp_mean_projected` and its
  :func:`privacy_record` (mechanism ``dpagg-gaussian-mean-subspace``; why and how: its docstring);
* ``dpagg_core.io.public_embeddings``: :class:`PublicEmbeddings` of PUBLIC images, their file
  (:func:`save_public_embeddings` / :func:`load_public_embeddings`, authenticated under a
  ledger's key) and the public-mean centre (:class:`PublicCentre`, :func:`public_mean_centre`);
* ``dpagg_core.aggregate.basis_builders``: the bases from public data
  (:func:`basis_from_token_table`, :func:`basis_from_public_embeddings`, formerly the
  classmethods ``PublicBasis.from_token_table`` / ``from_public_embeddings``) and basis files
  (:func:`save_basis` / :func:`load_basis`);
* ``dpagg_core.aggregate.basis_choice``: k and C from public embeddings (:func:`choose_k`,
  :func:`auto_k_candidates`, :func:`subspace_clip_norms`);
* ``dpagg_core.training.public``: ``train_public_embeddings`` (not re-exported here: the training
  layer sits above this one).

Every name below is the same object as in its new home; code inside ``dpagg_core`` imports from
the new homes.
"""

from __future__ import annotations

from dpagg_core.aggregate.basis_builders import (
    BASE_VOCAB_ROWS,
    BASIS_FORMAT,
    BASIS_MARKER,
    basis_from_public_embeddings,
    basis_from_token_table,
    load_basis,
    save_basis,
)
from dpagg_core.aggregate.basis_choice import (
    DEFAULT_MIN_COS,
    KChoice,
    auto_k_candidates,
    choose_k,
    subspace_clip_norms,
)
from dpagg_core.io.public_embeddings import (
    PUBLIC_FORMAT,
    PUBLIC_MARKER,
    PUBLIC_MEAN,
    PUBLIC_SOURCES,
    PUBLIC_TAG,
    PublicCentre,
    PublicEmbeddings,
    load_public_embeddings,
    public_file_tag,
    public_mean_centre,
    save_public_embeddings,
)
from dpagg_core.privacy.basis import (
    KINDS,
    MECHANISM,
    STRUCTURE,
    PublicBasis,
    basis_hash,
    check_basis,
    dp_mean_projected,
    privacy_record,
)

__all__ = [
    "BASE_VOCAB_ROWS",
    "BASIS_FORMAT",
    "BASIS_MARKER",
    "DEFAULT_MIN_COS",
    "KINDS",
    "MECHANISM",
    "PUBLIC_FORMAT",
    "PUBLIC_MARKER",
    "PUBLIC_MEAN",
    "PUBLIC_SOURCES",
    "PUBLIC_TAG",
    "STRUCTURE",
    "KChoice",
    "PublicBasis",
    "PublicCentre",
    "PublicEmbeddings",
    "auto_k_candidates",
    "basis_from_public_embeddings",
    "basis_from_token_table",
    "basis_hash",
    "check_basis",
    "choose_k",
    "dp_mean_projected",
    "load_basis",
    "load_public_embeddings",
    "privacy_record",
    "public_file_tag",
    "public_mean_centre",
    "save_basis",
    "save_public_embeddings",
    "subspace_clip_norms",
]
