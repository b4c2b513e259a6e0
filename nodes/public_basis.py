"""The **Public Basis** node: a PUBLIC subspace basis for DP Aggregate, from the checkpoint's
token table or a `dpagg public-basis` file."""

from __future__ import annotations

import math
from typing import Any

import torch
from comfy_api.latest import io

from dpagg_core.aggregate.basis_builders import basis_from_token_table, load_basis
from dpagg_core.errors import DpaggError
from dpagg_core.paths import resolve_path
from dpagg_core.training import ti

from .common import (
    BASIS_SOURCES,
    CATEGORY,
    PublicBasisIO,
    _ui,
)


def _checkpoint_tables(model: Any, clip: Any) -> tuple[str, str, dict[str, torch.Tensor]]:
    """(family, base-model id, token tables) of ComfyUI's MODEL/CLIP, the id as Per-Image TI
    records it (a seam: CI tests substitute tiny tables)."""
    from .comfy_backend import checkpoint_tables

    return checkpoint_tables(model, clip)


def basis_lines(basis: Any) -> list[str]:
    """Public description of a basis for a node message."""
    return [
        f"public basis: {basis.kind}, k = {basis.k} per vector x {basis.vectors} vector(s): "
        f"noise on K = {basis.dim} of D = {basis.flat_dim} coordinates "
        f"(noise norm x{math.sqrt(basis.dim / basis.flat_dim):.2f})",
        f"model {basis.base_model_id or '(unnamed)'}, sha256 {basis.sha256[:16]}",
    ]


class PublicBasisNode(io.ComfyNode):
    """A PUBLIC subspace basis for DP Aggregate: from the checkpoint's token table or a file."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DpaggPublicBasis",
            display_name="Public Basis (dpagg)",
            category=CATEGORY,
            description=(
                "A public orthonormal basis (k directions per vector) for DP Aggregate, which "
                "then adds its noise on k instead of all coordinates. token_table: the top-k "
                "principal directions of the connected checkpoint's token-embedding table "
                "(public: it ships with the model). file: a basis written by `dpagg "
                "public-basis` (e.g. from embeddings of PUBLIC images). Never built from the "
                "private images."
            ),
            inputs=[
                io.Combo.Input("source", options=list(BASIS_SOURCES), default="token_table"),
                io.Int.Input("k", default=8, min=1, max=1280, tooltip="directions per vector"),
                io.Int.Input(
                    "vectors",
                    default=1,
                    min=1,
                    max=ti.MAX_VECTORS,
                    tooltip="vectors per token: the same as Per-Image TI's",
                ),
                io.String.Input(
                    "basis_file",
                    default="",
                    tooltip="for source=file: a .safetensors basis file (`dpagg public-basis`)",
                ),
                io.Model.Input("model", optional=True, tooltip="for source=token_table"),
                io.Clip.Input("clip", optional=True, tooltip="for source=token_table"),
            ],
            outputs=[PublicBasisIO.Output(display_name="PUBLIC_BASIS")],
        )

    @classmethod
    def validate_inputs(cls, **kwargs: Any) -> bool | str:
        source = kwargs.get("source")
        if source not in BASIS_SOURCES:
            return f"source={source!r}: use one of {list(BASIS_SOURCES)}"
        if source == "file" and not str(kwargs.get("basis_file", "")).strip():
            return "basis_file: give the basis file (`dpagg public-basis --out FILE`)"
        return True

    @classmethod
    def execute(cls, source, k, vectors, basis_file, model=None, clip=None) -> io.NodeOutput:
        if source == "file":
            basis = load_basis(resolve_path(str(basis_file)))
        elif source == "token_table":
            family, model_id, tables = _checkpoint_tables(model, clip)
            basis = basis_from_token_table(
                tables, int(k), vectors=int(vectors), model_family=family, base_model_id=model_id
            )
        else:
            raise DpaggError(f"source={source!r}: use one of {list(BASIS_SOURCES)}")
        info = {
            "kind": basis.kind,
            "k": basis.k,
            "K": basis.dim,
            "D": basis.flat_dim,
            "vectors": basis.vectors,
            "base_model_id": basis.base_model_id,
            "sha256": basis.sha256,
        }
        return io.NodeOutput(basis, ui=_ui("Public Basis", basis_lines(basis), basis=info))
