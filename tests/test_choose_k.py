"""subspace.choose_k (leave-one-public-style-out choice of k) and `dpagg public-basis --k auto`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpagg_core.aggregate.basis_builders import basis_from_public_embeddings
from dpagg_core.aggregate.subspace import (
    KChoice,
    PublicEmbeddings,
    auto_k_candidates,
    choose_k,
    load_basis,
)
from dpagg_core.errors import DpaggError
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.io.images import dataset_id_for

DIM, V = 32, 2


def styled_public(
    r: int, *, styles: int = 8, per_style: int = 5, noise: float = 0.01, seed: int = 0
) -> tuple[PublicEmbeddings, np.ndarray, np.ndarray]:
    """Public embeddings whose styles differ only along a known r-dimensional subspace Q (per
    vector) plus small isotropic noise: image i of style s, vector j = c_j + Q a_sj + noise."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(DIM, r, generator=gen, dtype=torch.float64))
    centre = 0.3 * torch.randn(V, DIM, generator=gen, dtype=torch.float64)
    rows, groups = [], []
    for s in range(styles):
        offset = (q @ torch.randn(r, V, generator=gen, dtype=torch.float64)).T  # [V, DIM]
        for _ in range(per_style):
            rows.append(centre + offset + noise * torch.randn(V, DIM, generator=gen))
            groups.append(s)
    public = PublicEmbeddings(
        vectors={"emb_params": torch.stack(rows).float()},
        model_family="sd1",
        base_model_id="test-model",
        centre={"emb_params": centre.float()},
        initializer="painting",
    )
    return public, np.asarray(groups), q.numpy()


def test_choose_k_picks_the_smallest_candidate_that_spans_the_style_subspace():
    public, groups, _ = styled_public(6)
    choice = choose_k(public, groups, [2, 4, 6, 8, 12])
    assert isinstance(choice, KChoice)
    assert (choice.k, choice.met, choice.min_cos, choice.groups) == (6, True, 0.95, 8)
    by_k = {r["k"]: r for r in choice.rows}
    assert [r["k"] for r in choice.rows] == [2, 4, 6, 8, 12]
    for k in (2, 4):  # well below r: a held-out style loses part of its mean
        assert by_k[k]["cos_mean"] < 0.95 and by_k[k]["cos_min"] < 0.95
    for k in (6, 8, 12):  # r or more: the held-out mean is (almost) in the fitted subspace
        assert by_k[k]["cos_min"] > 0.99
    for r in choice.rows:
        assert r["usable"] and r["cos_min"] <= r["cos_mean"] <= 1.0 + 1e-12
    # The rule is the MEAN cosine: the smallest candidate reaching 0.95; unsorted, repeated input
    # is fine, and r itself need not be a candidate.
    other = choose_k(public, list(groups), [16, 8, 4, 8])
    assert (other.k, other.met) == (8, True) and [r["k"] for r in other.rows] == [4, 8, 16]


def test_choose_k_marks_unsupported_k_and_accepts_any_labels():
    public, groups, _ = styled_public(3, styles=4, per_style=3)
    names = np.array(["ink", "oil", "pixel", "watercolour"])[groups]
    choice = choose_k(public, names, [2, 3, 33])  # 33 > the 32-wide vectors
    assert (choice.k, choice.met, choice.groups) == (3, True, 4)
    bad = choice.rows[-1]
    assert bad["k"] == 33 and not bad["usable"] and bad["cos_min"] is None and "k=33" in bad["why"]
    with pytest.raises(DpaggError, match="no candidate k"):
        choose_k(public, names, [33, 40])


def test_choose_k_reports_when_no_k_qualifies():
    public, groups, _ = styled_public(16, styles=5, per_style=4)
    choice = choose_k(public, groups, [1, 2, 4])
    assert not choice.met
    mean = {r["k"]: r["cos_mean"] for r in choice.rows}
    assert max(mean.values()) < 0.95
    assert choice.k == max(mean, key=mean.get)
    styled, labels, _ = styled_public(6)
    strict = choose_k(styled, labels, [4, 6, 8], min_cos=1.0)  # the noise keeps every cos < 1
    mean = {r["k"]: r["cos_mean"] for r in strict.rows}
    assert not strict.met and strict.k == max(mean, key=mean.get) and strict.k >= 6


def test_choose_k_needs_three_public_styles():
    public, groups, _ = styled_public(3, styles=4, per_style=3)
    with pytest.raises(DpaggError, match="at least 3 styles.*subfolders.*--k K"):
        choose_k(public, np.minimum(groups, 1), [2, 4])
    with pytest.raises(DpaggError, match="one style label per public image"):
        choose_k(public, groups[:-1], [2, 4])
    with pytest.raises(DpaggError, match="min_cos"):
        choose_k(public, groups, [2], min_cos=1.5)
    with pytest.raises(DpaggError, match="positive integer"):
        choose_k(public, groups, [0])


def test_choose_k_refuses_the_private_set():
    gen = torch.Generator().manual_seed(1)
    centre = torch.randn(V, DIM, generator=gen)
    eset = EmbeddingSet(
        vectors={"emb_params": (centre + 0.2 * torch.randn(12, V, DIM, generator=gen)).float()},
        kind="textual_inversion",
        model_family="sd1",
        base_model_id="test-model",
        centre={"emb_params": centre.float()},
        initializer="painting",
        dataset_id=dataset_id_for([b"s"], key=b"test-key-" + bytes(23)),
    )
    with pytest.raises(DpaggError, match="EmbeddingSet"):
        choose_k(eset, np.arange(12) % 3, [2, 4])
    with pytest.raises(DpaggError, match="PublicEmbeddings"):
        choose_k(eset.flat(), np.arange(12) % 3, [2, 4])


def test_choose_k_is_deterministic():
    public, groups, _ = styled_public(5, seed=3)
    a = choose_k(public, groups, [2, 4, 8, 16])
    b = choose_k(public, groups.copy(), [2, 4, 8, 16])
    assert a == b and a.k == 8


def test_auto_k_candidates():
    assert auto_k_candidates(32) == (4, 8, 12, 16, 24, 32)
    assert auto_k_candidates(768) == (
        4,
        8,
        12,
        16,
        24,
        32,
        48,
        64,
        96,
        128,
        192,
        256,
        384,
        512,
        768,
    )
    assert auto_k_candidates(1280)[-3:] == (512, 768, 1024)
    assert auto_k_candidates(20) == (4, 8, 12, 16)
    assert auto_k_candidates(3) == (3,)


# --------------------------------------------------------------------------------------------
# CLI: public-basis --k auto
# --------------------------------------------------------------------------------------------


def _images(folder: Path, count: int, shade: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (32, 32), (shade + 20 * i, 200 - 30 * i, 90)).save(folder / f"{i}.png")
    return folder


def test_cli_k_auto_is_validated_before_the_model_loads(tmp_path, capsys):
    from dpagg_core.cli import main

    missing = ["--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "b.safetensors")]
    assert main(["public-basis", "--kind", "token_table", "--k", "auto", *missing]) == 2
    assert "--k auto" in capsys.readouterr().err
    flat = _images(tmp_path / "flat", 4, 10)
    assert main(["public-basis", "--public-images", str(flat), "--k", "auto", *missing]) == 2
    err = capsys.readouterr().err
    assert "at least 3 subfolders" in err and "give k explicitly" in err
    two = tmp_path / "two"
    for s in range(2):
        _images(two / f"style{s}", 2, 10 + 60 * s)
    assert main(["public-basis", "--public-images", str(two), "--k", "auto", *missing]) == 2
    assert "(found 2)" in capsys.readouterr().err
    for s in (2, 3):
        _images(two / f"style{s}", 2, 10 + 60 * s)
    _images(two, 1, 200)  # a loose image beside the style folders
    assert main(["public-basis", "--public-images", str(two), "--k", "auto", *missing]) == 2
    assert "outside them" in capsys.readouterr().err
    for bad in ("zero", "0", "-3"):
        with pytest.raises(SystemExit):
            main(["public-basis", "--k", bad, *missing])
        assert "positive integer or 'auto'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny_models import tiny_pipeline

    folder = tmp_path_factory.mktemp("model")
    tiny_pipeline(hidden_size=32, seed=0).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_cli_public_basis_k_auto(tmp_path, tiny_model_dir, capsys):
    from dpagg_core.cli import main

    public = tmp_path / "public"
    for s in range(3):
        _images(public / f"style{s}", 2, 10 + 70 * s)
    common = ["--model", str(tiny_model_dir), "--steps", "2", "--resolution", "32"]
    out = tmp_path / "auto.basis.safetensors"
    argv = ["public-basis", "--public-images", str(public), "--k", "auto", "--vectors", "2"]
    assert main([*argv, *common, "--out", str(out), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    choice = payload["k_choice"]
    assert choice["groups"] == ["style0", "style1", "style2"] and choice["min_cos"] == 0.95
    assert [r["k"] for r in choice["rows"]] == [4, 8, 12, 16, 24, 32]  # capped at the width 32
    basis = load_basis(out)
    assert basis.k == choice["k"] == int(payload["basis_k"]) and basis.vectors == 2
    usable = [r for r in choice["rows"] if r["usable"]]
    assert choice["k"] in [r["k"] for r in usable]
    # each fit sees 2 styles x 2 images x 2 vectors = 8 centred rows: rank <= 7
    assert all(not r["usable"] for r in choice["rows"] if r["k"] > 7)
    out2 = tmp_path / "auto2.basis.safetensors"
    assert main([*argv, *common, "--out", str(out2)]) == 0
    text = capsys.readouterr().out
    assert "worst cos" in text and "<- chosen" in text and "leave one style out" in text
    # The C to pass with this basis, from the same public embeddings, in the K coordinates.
    c = payload["suggested_clip_norm"]
    assert c["initializer"] > 0 and c["public_mean"] > 0 and "--centre public_mean" in text


def test_subspace_clip_norms_are_public_medians_in_the_k_coordinates():
    from dpagg_core.aggregate.subspace import subspace_clip_norms

    public, _, _ = styled_public(6, noise=0.1)
    basis = basis_from_public_embeddings(public, 4)
    x = public.vectors["emb_params"].double().reshape(public.n, -1).numpy()
    init = public.centre["emb_params"].double().reshape(-1).numpy()
    got = subspace_clip_norms(public, basis)
    for kind, centre in (("initializer", init), ("public_mean", x.mean(0))):
        in_k = np.linalg.norm((x - centre) @ basis.U, axis=1)
        assert got[kind] == pytest.approx(float(np.median(in_k)), rel=1e-12)
        # Projection never lengthens a row: the subspace C is at most the full-space one.
        assert got[kind] <= float(np.median(np.linalg.norm(x - centre, axis=1)))
    assert subspace_clip_norms(public, basis, 1.0)["initializer"] == pytest.approx(
        float(np.max(np.linalg.norm((x - init) @ basis.U, axis=1)))
    )
    with pytest.raises(DpaggError, match="quantile"):
        subspace_clip_norms(public, basis, 0.0)


def test_subspace_clip_norms_refuse_the_private_set():
    from dpagg_core.aggregate.subspace import subspace_clip_norms

    public, _, _ = styled_public(6)
    basis = basis_from_public_embeddings(public, 4)
    private = EmbeddingSet(
        vectors={"emb_params": public.vectors["emb_params"]},
        kind="textual_inversion",
        model_family="sd1",
        base_model_id="test-model",
        centre={"emb_params": public.centre["emb_params"]},
        initializer="painting",
        dataset_id="private",
    )
    with pytest.raises(DpaggError, match="PRIVATE"):
        subspace_clip_norms(private, basis)
