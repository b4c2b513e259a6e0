"""The Public Basis node (``nodes/public_basis.py``), ComfyUI absent.
Shared helpers: ``tests/nodes_fixtures.py``."""

from __future__ import annotations


def test_public_basis_node_from_token_table_or_file(pack, comfy_base, fake_checkpoint, tmp_path):
    """token_table: built from the CHECKPOINT's table with the ComfyUI backend's model id; file:
    a saved basis round-trips; the UI names kind, k, K, D and the hash (public values)."""
    from dpagg_core.aggregate.subspace import load_basis, save_basis

    node = pack["public_basis"].PublicBasisNode
    out = node.execute(source="token_table", k=4, vectors=2, basis_file="", model="M", clip="C")
    basis = out.args[0]
    assert fake_checkpoint == [("M", "C")]
    assert (basis.kind, basis.k, basis.dim, basis.flat_dim) == ("token_table", 4, 8, 32)
    assert basis.base_model_id == "comfyui:sd1:0123456789abcdef"
    info = out.ui["dpagg"][0]
    assert info["basis"]["K"] == 8 and info["basis"]["sha256"] == basis.sha256
    assert "K = 8 of D = 32" in info["lines"][0] and "x0.50" in info["lines"][0]
    path = save_basis(basis, tmp_path / "b.basis.safetensors")
    again = node.execute(source="file", k=1, vectors=1, basis_file=str(path)).args[0]
    assert again.sha256 == basis.sha256 == load_basis(path).sha256
    assert node.validate_inputs(source="file", basis_file="") != True  # noqa: E712
    assert node.validate_inputs(source="token_table", basis_file="") is True
