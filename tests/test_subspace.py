"""Aggregation in a public subspace (dpagg_core.aggregate.subspace): the mechanism, the basis, the
ledger, the audit, SDXL, the released file and the CLI.

Statistical checks use chi-square / binomial bounds at 1e-7 per side (a correct mechanism fails
one with probability ~1e-7). Float32 checks: a release is published at float32, so "in span(U)"
holds up to float32 rounding of a vector of norm ~1: a residual below 1e-6 * ||release||.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from tiny_models import tiny_text_encoder

from dpagg_core.aggregate.basis_builders import basis_from_public_embeddings, basis_from_token_table
from dpagg_core.aggregate.release import release_embeddings, release_vectors
from dpagg_core.aggregate.subspace import (
    MECHANISM,
    PublicBasis,
    PublicEmbeddings,
    basis_hash,
    dp_mean_projected,
    load_basis,
    save_basis,
    save_public_embeddings,
)
from dpagg_core.errors import DpaggError
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.io.images import dataset_id_for
from dpagg_core.io.private_file import save_private
from dpagg_core.io.released_file import read_released
from dpagg_core.privacy import mechanism
from dpagg_core.privacy.accountant import PrivacyPlan
from dpagg_core.privacy.audit import audit
from dpagg_core.privacy.calibration import calibrate
from dpagg_core.privacy.ledger import Ledger
from dpagg_core.privacy.request_keys import request_key
from dpagg_core.showcase.minimodel import small_clip_text_config
from dpagg_core.training.models import base_model_id_of

KEY = bytes(range(32))
F32 = 1e-6  # relative float32 tolerance (2^-23 ~ 1.2e-7 per value, summed over a few dims)


@pytest.fixture(scope="module")
def te32():
    return tiny_text_encoder(32, seed=0)


@pytest.fixture(scope="module")
def model_id(te32) -> str:
    return base_model_id_of([te32])


@pytest.fixture(scope="module")
def basis4(te32) -> PublicBasis:
    return basis_from_token_table(te32, 4, vectors=2)


def make_set(base_model_id: str, n: int = 20, v: int = 2, dim: int = 32, seed: int = 0, tag=b"s"):
    gen = torch.Generator().manual_seed(seed)
    centre = 0.3 * torch.randn(v, dim, generator=gen)
    return EmbeddingSet(
        vectors={"emb_params": (centre + 0.2 * torch.randn(n, v, dim, generator=gen)).float()},
        kind="textual_inversion",
        model_family="sd1",
        base_model_id=base_model_id,
        centre={"emb_params": centre.float()},
        initializer="painting",
        dataset_id=dataset_id_for([tag], key=KEY),
    )


def plan_full(n: int, z: float) -> PrivacyPlan:
    return PrivacyPlan(
        sampling="full", n=n, delta=1e-5, noise_multiplier=z, epsilon=1.0, accountant="test"
    )


def residual(basis: PublicBasis, delta: np.ndarray) -> float:
    """Norm of the part of ``delta`` outside span(U)."""
    return float(np.linalg.norm(delta - basis.U @ (basis.U.T @ delta)))


# --------------------------------------------------------------------------------------------
# The basis
# --------------------------------------------------------------------------------------------


def test_token_table_basis_is_orthonormal_block_diagonal_and_names_its_model(te32, model_id):
    b = basis_from_token_table(te32, 4, vectors=2)
    assert (b.kind, b.k, b.vectors, b.dim, b.flat_dim) == ("token_table", 4, 2, 8, 64)
    assert b.base_model_id == model_id and b.model_family == "sd1" and b.centred
    np.testing.assert_allclose(b.U.T @ b.U, np.eye(8), atol=1e-12)
    block = b.blocks["emb_params"]
    assert np.array_equal(b.U[:32, :4], block) and np.array_equal(b.U[32:, 4:], block)
    assert not b.U[:32, 4:].any() and not b.U[32:, :4].any()  # per vector: block-diagonal
    # the top-4 principal directions of the centred table, as numpy computes them
    table = te32.get_input_embeddings().weight.detach().double().numpy()[:49408]
    cov = np.cov(table, rowvar=False, bias=True)
    vals, vecs = np.linalg.eigh(cov)
    top = vecs[:, np.argsort(vals)[::-1][:4]]
    np.testing.assert_allclose(np.abs(top.T @ block), np.eye(4), atol=1e-8)
    assert b.sha256 == basis_hash(b.U) and len(b.sha256) == 64
    assert b.typical_norms["emb_params"] == pytest.approx(
        float(np.median(np.linalg.norm(table, axis=1)))
    )
    with pytest.raises(DpaggError, match="k="):
        basis_from_token_table(te32, 33)
    # a backend that names models its own way (ComfyUI) passes its id; U is the same
    named = basis_from_token_table(te32, 4, vectors=2, base_model_id="comfyui:sd1:0a1b")
    assert named.base_model_id == "comfyui:sd1:0a1b" and named.sha256 == b.sha256


def test_basis_cannot_be_built_from_private_input(tmp_path, te32, model_id):
    eset = make_set(model_id)
    with pytest.raises(DpaggError, match="EmbeddingSet"):
        basis_from_public_embeddings(eset, 4)
    with pytest.raises(DpaggError, match="EmbeddingSet"):
        basis_from_token_table(eset, 4)
    with pytest.raises(DpaggError, match="EmbeddingSet"):
        PublicEmbeddings(
            vectors=eset,  # type: ignore[arg-type]
            model_family="sd1",
            base_model_id=model_id,
            centre=eset.centre,
        )
    # the private rows as a "table": refused (a model's table has the 49408-row vocabulary)
    with pytest.raises(DpaggError, match="49408"):
        basis_from_token_table(torch.from_numpy(eset.flat()), 4)
    # a private file (save_private) is refused by every reader of public inputs
    private = save_private(eset, tmp_path / "vault" / "set.safetensors", key=KEY)
    with pytest.raises(DpaggError, match="PRIVATE"):
        basis_from_public_embeddings(private, 4)
    with pytest.raises(DpaggError, match="PRIVATE"):
        basis_from_public_embeddings(str(private), 4)
    with pytest.raises(DpaggError, match="PRIVATE"):
        load_basis(private)


def test_public_embeddings_basis_and_basis_file_round_trip(tmp_path, model_id):
    gen = torch.Generator().manual_seed(3)
    centre = torch.randn(2, 32, generator=gen)
    public = PublicEmbeddings(
        vectors={"emb_params": centre + 0.3 * torch.randn(12, 2, 32, generator=gen)},
        model_family="sd1",
        base_model_id=model_id,
        centre={"emb_params": centre},
        initializer="painting",
    )
    b = basis_from_public_embeddings(public, 5)
    assert (b.kind, b.k, b.dim, b.rows, b.centred) == ("public_embeddings", 5, 10, 24, True)
    deltas = (public.vectors["emb_params"] - centre).double().reshape(-1, 32).numpy()
    for basis, moment in (
        (b, np.cov(deltas, rowvar=False, bias=True)),  # default: centred PCA of the deltas
        (
            basis_from_public_embeddings(public, 5, centred=False),
            deltas.T @ deltas / len(deltas),  # second moment around the public centre
        ),
    ):
        vals, vecs = np.linalg.eigh(moment)
        top = vecs[:, np.argsort(vals)[::-1][:5]]
        np.testing.assert_allclose(np.abs(top.T @ basis.blocks["emb_params"]), np.eye(5), atol=1e-6)
    mean = public.vectors["emb_params"].double().mean(0)  # typical norm: of the public MEAN
    assert b.typical_norms["emb_params"] == pytest.approx(float(np.median(mean.norm(dim=1))))
    # from its file too (a PUBLIC embeddings file), same basis
    pfile = save_public_embeddings(public, tmp_path / "public.safetensors")
    assert basis_from_public_embeddings(pfile, 5).sha256 == b.sha256

    path = save_basis(b, tmp_path / "b.safetensors")
    again = load_basis(path)
    assert again.sha256 == b.sha256 and np.array_equal(again.U, b.U)
    assert (again.kind, again.k, again.base_model_id) == (b.kind, b.k, b.base_model_id)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["dpagg_public_basis"] == "true" and meta["sha256"] == b.sha256
    assert meta["kind"] == "public_embeddings" and meta["k"] == "5"
    with pytest.raises(DpaggError, match="never overwrites|exists"):
        save_basis(b, path)
    with pytest.raises(DpaggError, match="embeddings"):
        save_basis(b, tmp_path / "models" / "embeddings" / "b.safetensors")
    # an edited basis file (U changed, header kept) is refused
    import safetensors.torch

    tensors = {
        "basis.emb_params": torch.from_numpy(np.ascontiguousarray(b.blocks["emb_params"][:, ::-1]))
    }
    safetensors.torch.save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=meta)
    with pytest.raises(DpaggError, match="sha256"):
        load_basis(tmp_path / "edited.safetensors")


# --------------------------------------------------------------------------------------------
# The projected mechanism
# --------------------------------------------------------------------------------------------


def test_release_is_centre_plus_U_times_mean_of_subspace_clipped_coordinates(
    monkeypatch, basis4, model_id
):
    eset = make_set(model_id, n=20)
    x, c = eset.flat(), eset.flat_centre()
    monkeypatch.setattr(mechanism, "_gaussian_noise", lambda shape, std: np.zeros(shape))
    plan = plan_full(20, 1.0)
    rel = dp_mean_projected(
        x,
        plan=plan,
        clip_norm=0.05,
        basis=basis4,
        center=c,
        centre_kind="initializer",
        base_model_id=model_id,
    )
    y = (x - c) @ basis4.U
    norms = np.linalg.norm(y, axis=1)
    assert (norms > 0.05).sum() >= 10  # the clip acts (in the subspace)
    y = y * np.minimum(1.0, 0.05 * (1 - 1e-12) / norms)[:, None]
    expected = c + basis4.U @ y.mean(axis=0)
    np.testing.assert_allclose(rel.vector, expected, rtol=0, atol=F32)
    assert np.array_equal(rel.vector, rel.vector.astype(np.float32).astype(np.float64))


def test_release_minus_centre_lies_in_span_of_U(basis4, model_id):
    eset = make_set(model_id, n=20)
    c = eset.flat_centre()
    plan = calibrate(1.0, 1e-5, 20, "full")
    for _ in range(20):
        r = dp_mean_projected(
            eset.flat(),
            plan=plan,
            clip_norm=0.5,
            basis=basis4,
            center=c,
            centre_kind="initializer",
            base_model_id=model_id,
        ).vector
        assert residual(basis4, r - c) <= F32 * np.linalg.norm(r)
        assert np.linalg.norm(r - c) > 10 * F32 * np.linalg.norm(r)  # not trivially zero


def test_noise_in_k_coordinates_has_the_planned_std_and_its_norm_scales_with_sqrt_k(te32):
    n, c_norm, z = 4, 1.0, 2.0
    plan = plan_full(n, z)
    sigma = plan.noise_std(c_norm)
    assert sigma == pytest.approx(1.0)  # z * 2C / n
    draws = 400
    mean_sq = {}
    for k in (2, 8, 32):
        basis = basis_from_token_table(te32, k, vectors=2)
        centre = np.linspace(-1, 1, 64)
        data = np.tile(centre, (n, 1))  # every item at the centre: the clipped mean is 0
        model = basis.base_model_id
        coords = np.stack(
            [
                basis.U.T
                @ (
                    dp_mean_projected(
                        data,
                        plan=plan,
                        clip_norm=c_norm,
                        basis=basis,
                        center=centre,
                        centre_kind="initializer",
                        base_model_id=model,
                    ).vector
                    - centre
                )
                for _ in range(draws)
            ]
        )  # [draws, K] noise coordinates
        dof = coords.size
        stat = float(np.sum(coords**2)) / sigma**2  # ~ chi-square(draws * K)
        assert stats.chi2.ppf(1e-7, dof) <= stat <= stats.chi2.ppf(1 - 1e-7, dof)
        assert abs(coords.mean()) <= 5.5 * sigma / np.sqrt(dof)
        mean_sq[basis.dim] = stat / draws  # E ||noise||^2 / sigma^2 = K
    # the noise norm scales ~ sqrt(K): mean squared norms ~ K within the chi-square bounds
    for kk, ms in mean_sq.items():
        lo, hi = stats.chi2.ppf([1e-7, 1 - 1e-7], draws * kk) / draws
        assert lo <= ms <= hi
    assert mean_sq[64] / mean_sq[4] == pytest.approx(16.0, rel=0.25)


def test_basis_mismatch_is_refused_before_anything_is_spent(tmp_path, te32, basis4, model_id):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    plan = calibrate(1.0, 1e-5, 20, "full")
    kw = dict(plan=plan, clip_norm=0.5, out_dir=tmp_path / "emb", ledger=ledger)
    one_vector = make_set(model_id, v=1)
    with pytest.raises(DpaggError, match=r"D=64.*D=32.*--vectors 1"):
        release_embeddings(one_vector, name="a", basis=basis4, **kw)
    other = make_set("0123456789abcdef")
    with pytest.raises(DpaggError, match=rf"{basis4.base_model_id}.*0123456789abcdef"):
        release_embeddings(other, name="a", basis=basis4, **kw)
    with pytest.raises(DpaggError, match="base model"):
        release_vectors(
            ledger,
            other.flat(),
            dataset_id=other.dataset_id,
            plan=plan,
            clip_norm=0.5,
            name="a",
            base_model_id=other.base_model_id,
            basis=basis4,
        )
    assert ledger.list_releases() == [] and not (tmp_path / "emb").exists()


def test_record_request_key_and_identical_rerun(tmp_path, te32, basis4, model_id):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    eset = make_set(model_id)
    plan = calibrate(1.0, 1e-5, eset.n, "full")
    out = tmp_path / "embeddings"
    kw = dict(plan=plan, clip_norm=0.5, out_dir=out, ledger=ledger, budget_epsilon=5.0)
    first = release_embeddings(eset, name="sub", basis=basis4, **kw)
    tensors, record = read_released(first.path)
    assert record["mechanism"] == MECHANISM == "dpagg-gaussian-mean-subspace"
    assert record["basis_kind"] == "token_table" and record["basis_k"] == "4"
    assert record["basis_dim"] == "8" and record["basis_sha256"] == basis4.sha256
    assert record["basis_structure"] == "per-vector" and record["basis_centred"] == "true"
    assert all(isinstance(v, str) for v in record.values())
    assert str(tmp_path) not in json.dumps(record)
    delta = tensors["emb_params"].double().reshape(-1).numpy() - eset.flat_centre()
    assert residual(basis4, delta) <= F32 * (1 + np.linalg.norm(delta))
    # the ledger stored the same (raw) release, with the basis named in its record
    row = ledger.get_release(first.release_id)
    assert row["record"]["basis_sha256"] == basis4.sha256
    assert np.array_equal(row["vector"].reshape(-1), tensors["emb_params"].double().reshape(-1))

    again = release_embeddings(eset, name="sub", basis=basis4, **kw)
    assert again.reused and again.path == first.path and again.spent_epsilon == first.spent_epsilon
    assert len(ledger.list_releases(eset.dataset_id)) == 1

    # the request key changes with the basis (and without one it is the old key)
    req = dict(
        dataset_id=eset.dataset_id,
        plan=plan,
        clip_norm=0.5,
        center=eset.flat_centre(),
        centre_kind="initializer",
        mode="clip",
        name="sub",
        base_model_id=model_id,
    )
    basis8 = basis_from_token_table(te32, 8, vectors=2)
    keys = {
        request_key(eset.flat(), **req),
        request_key(eset.flat(), **req, basis_sha256=basis4.sha256),
        request_key(eset.flat(), **req, basis_sha256=basis8.sha256),
    }
    assert len(keys) == 3
    assert request_key(eset.flat(), **req, basis_sha256=None) == request_key(eset.flat(), **req)
    other = release_embeddings(eset, name="sub8", basis=basis8, **kw)
    assert not other.reused and len(ledger.list_releases(eset.dataset_id)) == 2


# --------------------------------------------------------------------------------------------
# The audit of the projected mechanism
# --------------------------------------------------------------------------------------------


def _public_set(model_id: str, n: int = 12, v: int = 2, dim: int = 32, seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    centre = 0.3 * torch.randn(v, dim, generator=gen)
    return PublicEmbeddings(
        vectors={"emb_params": (centre + 0.2 * torch.randn(n, v, dim, generator=gen)).float()},
        model_family="sd1",
        base_model_id=model_id,
        centre={"emb_params": centre.float()},
        initializer="painting",
    )


def test_public_mean_centre_cannot_come_from_the_private_set(tmp_path, model_id):
    """The public-mean centre is built only from PublicEmbeddings (or their file): the private
    EmbeddingSet, a private file and a wrapped private set are refused, and release_embeddings
    refuses them (or a missing public input) before the ledger is touched."""
    from dpagg_core.aggregate.subspace import PublicCentre, public_mean_centre

    eset = make_set(model_id)
    with pytest.raises(DpaggError, match="EmbeddingSet"):
        public_mean_centre(eset)
    with pytest.raises(DpaggError, match="EmbeddingSet"):
        PublicCentre(vectors=eset, model_family="sd1", base_model_id=model_id, n_public=1)  # type: ignore[arg-type]
    private = save_private(eset, tmp_path / "vault" / "set.safetensors", key=KEY)
    for bad in (private, str(private)):
        with pytest.raises(DpaggError, match="PRIVATE"):
            public_mean_centre(bad)
    with pytest.raises(DpaggError, match="PublicEmbeddings"):
        public_mean_centre(eset.flat())
    ledger = Ledger(tmp_path / "ledger.sqlite")
    kw = dict(
        plan=calibrate(1.0, 1e-5, eset.n, "full"), clip_norm=0.5, out_dir=tmp_path / "emb",
        ledger=ledger, name="c", centre="public_mean",
    )  # fmt: skip
    for bad, match in ((eset, "EmbeddingSet"), (private, "PRIVATE"), (None, "PUBLIC images")):
        with pytest.raises(DpaggError, match=match):
            release_embeddings(eset, public_centre=bad, **kw)
    with pytest.raises(DpaggError, match="model"):  # public embeddings of another model
        release_embeddings(eset, public_centre=_public_set("0123456789abcdef"), **kw)
    with pytest.raises(DpaggError, match="--vectors"):
        release_embeddings(eset, public_centre=_public_set(model_id, v=1), **kw)
    assert ledger.list_releases() == [] and not (tmp_path / "emb").exists()


def test_release_around_the_public_mean_names_it_and_lies_in_its_span(tmp_path, basis4, model_id):
    from dpagg_core.aggregate.subspace import public_mean_centre
    from dpagg_core.privacy.mechanism import centre_hash

    eset = make_set(model_id)
    public = _public_set(model_id)
    pc = public_mean_centre(public)
    want = public.vectors["emb_params"].double().mean(0).float().double().reshape(-1).numpy()
    assert np.array_equal(pc.flat(), want) and pc.n_public == 12
    assert pc.sha256 == centre_hash(want) != centre_hash(eset.flat_centre())
    ledger = Ledger(tmp_path / "ledger.sqlite")
    kw = dict(
        plan=calibrate(2.0, 1e-5, eset.n, "full"), clip_norm=0.5, out_dir=tmp_path / "emb",
        ledger=ledger, budget_epsilon=10.0,
    )  # fmt: skip
    sub = release_embeddings(
        eset, name="pm", centre="public_mean", public_centre=public, basis=basis4,
        postprocess="js", **kw,
    )  # fmt: skip
    tensors, record = read_released(sub.path)
    assert record["centre"] == "public_mean" and record["centre_sha256"] == pc.sha256
    assert record["basis_sha256"] == basis4.sha256
    delta = tensors["emb_params"].double().reshape(-1).numpy() - pc.flat()
    assert np.linalg.norm(delta) > 0
    assert residual(basis4, delta) <= F32 * (1 + np.linalg.norm(delta))  # js shrinks toward pc
    assert ledger.get_release(sub.release_id)["record"]["centre_sha256"] == pc.sha256
    # full space, PublicCentre given directly: recorded too; another centre is another request
    full = release_embeddings(eset, name="pm2", centre="public_mean", public_centre=pc, **kw)
    assert full.record["centre_sha256"] == pc.sha256 and not full.reused
    init = release_embeddings(eset, name="pm3", **kw)
    assert init.record["centre"] == "initializer" and "centre_sha256" not in init.record
    assert len(ledger.list_releases(eset.dataset_id)) == 3


def test_audit_of_the_projected_mechanism_passes_and_catches_a_2x_sensitivity_bug(
    monkeypatch, basis4
):
    from dpagg_core.privacy.accountant import epsilon_for

    plan = epsilon_for(0.8, 0.05, 10, "wor", m=5)
    result = audit(plan, clip_norm=1.0, trials=3000, confidence=0.99, basis=basis4)
    assert result.passed, result.summary()
    assert result.power_half_noise > 0.99
    # the classic bug: replace-one sensitivity C/m instead of 2C/m (half the noise)
    monkeypatch.setattr(PrivacyPlan, "sensitivity", lambda self, c: c / self.denominator)
    bad = audit(plan, clip_norm=1.0, trials=3000, confidence=0.99, basis=basis4)
    assert not bad.passed and bad.empirical_epsilon_lower_bound > bad.audit_epsilon


# --------------------------------------------------------------------------------------------
# Released files: SD1 in diffusers, SDXL with two keys
# --------------------------------------------------------------------------------------------


def test_released_file_loads_in_diffusers(tmp_path, basis4, model_id):
    from tiny_models import tiny_pipeline

    eset = make_set(model_id)
    plan = calibrate(2.0, 1e-5, eset.n, "full")
    out = release_embeddings(
        eset,
        plan=plan,
        clip_norm=0.5,
        name="sub",
        out_dir=tmp_path / "embeddings",
        ledger=Ledger(tmp_path / "l.sqlite"),
        basis=basis4,
        postprocess="js",
    )
    pipe = tiny_pipeline(32, seed=0)  # the model the basis' table comes from
    assert base_model_id_of([pipe.text_encoder]) == model_id
    pipe.load_textual_inversion(str(out.path), token="<sub>")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<sub>", "<sub>_1"])
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(table[ids], out.vectors["emb_params"])
    with torch.no_grad():
        got, _ = pipe.encode_prompt("a cat in <sub> style", "cpu", 1, False)
    assert torch.isfinite(got).all()


def _sdxl_encoders():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(1)
    te2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**small_clip_text_config(64, projection_dim=32))
    ).eval()
    return tiny_text_encoder(32, seed=0), te2


def test_sdxl_each_encoder_in_its_own_subspace_and_the_file_loads(tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from safetensors.torch import load_file
    from tiny_models import tiny_vae

    from dpagg_core.training.tokenizer import clip_tokenizer

    te1, te2 = _sdxl_encoders()
    basis = basis_from_token_table({"clip_l": te1, "clip_g": te2}, 3, vectors=2)
    assert basis.model_family == "sdxl" and basis.base_model_id == base_model_id_of([te1, te2])
    assert (basis.flat_dim, basis.dim) == (2 * 32 + 2 * 64, 2 * 3 * 2)
    # clip_l's columns live in clip_l's rows only, and vice versa
    assert not basis.U[64:, :6].any() and not basis.U[:64, 6:].any()

    gen = torch.Generator().manual_seed(5)
    cen = {"clip_l": torch.randn(2, 32, generator=gen), "clip_g": torch.randn(2, 64, generator=gen)}
    eset = EmbeddingSet(
        vectors={k: c + 0.2 * torch.randn(16, *c.shape, generator=gen) for k, c in cen.items()},
        kind="textual_inversion",
        model_family="sdxl",
        base_model_id=basis.base_model_id,
        centre=cen,
        initializer="painting",
        dataset_id=dataset_id_for([b"xl"], key=KEY),
    )
    plan = calibrate(2.0, 1e-5, eset.n, "full")
    out = release_embeddings(
        eset,
        plan=plan,
        clip_norm=0.5,
        name="xl",
        out_dir=tmp_path / "embeddings",
        ledger=Ledger(tmp_path / "l.sqlite"),
        basis=basis,
    )
    sd = load_file(str(out.path))
    assert set(sd) == {"clip_l", "clip_g"}
    assert tuple(sd["clip_l"].shape) == (2, 32) and tuple(sd["clip_g"].shape) == (2, 64)
    for key, block in basis.blocks.items():
        delta = (sd[key].double() - cen[key].double()).numpy()  # [v, dim], each row in span(B)
        for row in delta:
            assert np.linalg.norm(row - block @ (block.T @ row)) <= F32 * (1 + np.linalg.norm(row))
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=None,
        scheduler=EulerDiscreteScheduler(),
        add_watermarker=False,
    )
    pipe.load_textual_inversion(
        sd["clip_l"], token="<xl>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        sd["clip_g"], token="<xl>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    for te, tok, key in ((te1, pipe.tokenizer, "clip_l"), (te2, pipe.tokenizer_2, "clip_g")):
        ids = tok.convert_tokens_to_ids(["<xl>", "<xl>_1"])
        assert torch.equal(te.get_input_embeddings().weight.detach()[ids], sd[key])


# --------------------------------------------------------------------------------------------
# CLI: public-basis (both kinds), run --basis --postprocess, audit --basis
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny_models import tiny_pipeline

    folder = tmp_path_factory.mktemp("model")
    tiny_pipeline(hidden_size=32, seed=0).save_pretrained(folder)
    return folder


def _images(folder: Path, count: int, shade: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (32, 32), (shade + 20 * i, 200 - 30 * i, 90)).save(folder / f"{i}.png")
    return folder


@pytest.mark.slow
def test_cli_public_basis_run_with_basis_and_audit(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from dpagg_core.cli import main
    from dpagg_core.training import ti

    def no_training(*_a, **_k):
        raise AssertionError("a basis that does not fit must be refused before training")

    public = _images(tmp_path / "public", 6, 10)
    private = _images(tmp_path / "private", 4, 90)
    common = ["--model", str(tiny_model_dir), "--steps", "2", "--resolution", "32"]
    pe_file = tmp_path / "pe.basis.safetensors"
    led = ["--ledger", str(tmp_path / "ledger.sqlite")]
    assert (
        main(
            ["public-basis", "--public-images", str(public), "--k", "3", "--vectors", "2"]
            + common
            + led
            + ["--out", str(pe_file), "--json"]
            + ["--save-public-embeddings", str(tmp_path / "pub.safetensors")]
        )
        == 0
    )
    payload = json.loads(capsys.readouterr().out)
    pe = load_basis(pe_file)
    assert payload["basis_sha256"] == pe.sha256 and pe.kind == "public_embeddings"
    assert (pe.k, pe.vectors, pe.dim) == (3, 2, 6)
    tt_file = tmp_path / "tt.basis.safetensors"
    argv = ["public-basis", "--kind", "token_table", "--k", "4", "--vectors", "2"]
    assert main(argv + ["--model", str(tiny_model_dir), "--out", str(tt_file)]) == 0
    tt = load_basis(tt_file)
    assert tt.base_model_id == pe.base_model_id and tt.kind == "token_table"
    capsys.readouterr()

    out = tmp_path / "embeddings"
    run = ["run", "--images", str(private), *common, "--vectors", "2", "--epsilon", "2"]
    run += ["--delta", "1e-2", "--clip-norm", "0.5", "--out-dir", str(out)]
    run += ["--ledger", str(tmp_path / "ledger.sqlite"), "--budget-epsilon", "10"]
    assert main([*run, "--name", "sub", "--basis", str(pe_file), "--postprocess", "js"]) == 0
    _, record = read_released(out / "sub.safetensors")
    assert record["basis_sha256"] == pe.sha256 and record["postprocess"] == "js"
    assert record["basis_kind"] == "public_embeddings"
    # --centre public_mean: the mean of the saved PUBLIC embeddings, named by its hash
    from dpagg_core.aggregate.subspace import public_mean_centre

    pc = public_mean_centre(tmp_path / "pub.safetensors")
    capsys.readouterr()
    # suggest-clip-norm gives the C for both centres by the same quantile rule (public images)
    from dpagg_core.aggregate.subspace import load_public_embeddings

    argv = ["suggest-clip-norm", "--public-images", str(public), "--vectors", "2", *common, *led]
    assert main([*argv, "--json"]) == 0
    suggested = json.loads(capsys.readouterr().out)
    pub = load_public_embeddings(tmp_path / "pub.safetensors").vectors["emb_params"]
    pub = pub.double().flatten(1).numpy()
    to_mean = np.quantile(np.linalg.norm(pub - pub.mean(0), axis=1), 0.9)
    assert suggested["clip_norm_public_mean"] == pytest.approx(to_mean, rel=1e-4)
    assert suggested["clip_norm_public_mean"] < suggested["clip_norm"]
    assert main([*run, "--name", "pm", "--centre", "public_mean"]) == 2  # needs the file
    assert "--public-embeddings" in capsys.readouterr().err
    pm = ["--centre", "public_mean", "--public-embeddings", str(tmp_path / "pub.safetensors")]
    assert main([*run, "--name", "pm", "--basis", str(pe_file), *pm]) == 0
    _, record = read_released(out / "pm.safetensors")
    assert record["centre"] == "public_mean" and record["centre_sha256"] == pc.sha256
    # Public means public (issue 18 item 3): the private folder, or a copy, as "public" images
    # is refused by name; a public file tagged under another ledger is refused at release.
    capsys.readouterr()
    copy = tmp_path / "copy-of-private"
    shutil.copytree(private, copy)
    for verb in (["suggest-clip-norm"], ["public-basis", "--k", "2", "--out", "x.b"]):
        argv = [*verb, "--public-images", str(copy), "--vectors", "2", *common, *led]
        assert main(argv) == 2
        assert "recorded as PRIVATE" in capsys.readouterr().err
    other = ["--ledger", str(tmp_path / "other.sqlite")]
    assert main([*run[:-4], *other, "--budget-epsilon", "10", "--name", "pm-other", *pm]) == 2
    assert "failed its authentication check" in capsys.readouterr().err
    # a basis for another number of vectors is refused before training and spending
    capsys.readouterr()
    bad = [*run, "--name", "sub1", "--basis", str(pe_file)]
    bad[bad.index("--vectors") + 1] = "1"
    monkeypatch.setattr(ti, "train_embeddings", no_training)
    assert main(bad) == 2 and "--vectors 1" in capsys.readouterr().err
    assert len(Ledger(tmp_path / "ledger.sqlite").list_releases()) == 2
    # DP-SGD takes the same basis (public-subspace DP-SGD): its update lies in span(U), the
    # record names the basis; a basis for another --vectors is refused before anything is spent
    dpsgd = [a for a in run if a not in ("--clip-norm", "0.5")] + ["--method", "dpsgd"]
    assert main([*dpsgd, "--name", "x", "--basis", str(pe_file)]) == 0
    tensors, record = read_released(out / "x.safetensors")
    assert record["mechanism"] == "dpsgd-textual-inversion-subspace"
    assert record["basis_sha256"] == pe.sha256 and record["basis_dim"] == "6"
    # Both releases are centre + (something in span(U)) around the same initializer centre (the
    # DPAgg one after James-Stein, which only scales along its direction), so their difference
    # lies in span(U) up to float32 rounding.
    sub, _ = read_released(out / "sub.safetensors")
    diff = (tensors["emb_params"].double() - sub["emb_params"].double()).reshape(-1).numpy()
    outside = diff - pe.U @ (pe.U.T @ diff)
    assert np.linalg.norm(diff) > 0 and np.linalg.norm(outside) < 1e-5
    capsys.readouterr()
    bad = [*dpsgd, "--name", "x2", "--basis", str(pe_file)]
    bad[bad.index("--vectors") + 1] = "1"
    assert main(bad) == 2 and "--vectors 1" in capsys.readouterr().err
    assert len(Ledger(tmp_path / "ledger.sqlite").list_releases()) == 3

    argv = ["audit", "--epsilon", "1", "--delta", "1e-5", "--n", "50", "--trials", "500"]
    assert main([*argv, "--basis", str(tt_file), "--json"]) == 0  # fails w.p. < 1 %
    audit_payload = json.loads(capsys.readouterr().out)
    assert audit_payload["basis"]["basis_sha256"] == tt.sha256 and audit_payload["passed"]
