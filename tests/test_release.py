"""End-to-end release: EmbeddingSet -> ledger -> released file (the path both CLI and nodes use)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dpagg_core.aggregate.release import release_embeddings
from dpagg_core.errors import BudgetExceeded, DpaggError
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.io.images import dataset_id_for
from dpagg_core.io.released_file import read_released
from dpagg_core.privacy.calibration import calibrate
from dpagg_core.privacy.ledger import Ledger


def make_set(n: int = 20, dim: int = 16, seed: int = 0, tag: bytes = b"set") -> EmbeddingSet:
    gen = torch.Generator().manual_seed(seed)
    centre = torch.randn(1, dim, generator=gen)
    return EmbeddingSet(
        vectors={"emb_params": (centre + 0.2 * torch.randn(n, 1, dim, generator=gen)).float()},
        kind="textual_inversion",
        model_family="sd1",
        base_model_id="test-model",
        centre={"emb_params": centre.float()},
        initializer="painting",
        dataset_id=dataset_id_for([tag], key=b"test-key-" + bytes(23)),
    )


@pytest.fixture()
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.sqlite")


def test_release_writes_loadable_file_with_record_and_spends_once(tmp_path, ledger):
    eset = make_set()
    plan = calibrate(1.0, 1e-3, eset.n, "full")
    out = tmp_path / "embeddings"
    first = release_embeddings(
        eset, plan=plan, clip_norm=0.5, name="mystyle", out_dir=out, ledger=ledger
    )
    assert first.path == out / "mystyle.safetensors" and first.prompt == "embedding:mystyle"
    tensors, record = read_released(first.path)
    assert set(tensors) == {"emb_params"} and tuple(tensors["emb_params"].shape) == (1, 16)
    assert torch.equal(tensors["emb_params"], first.vectors["emb_params"])
    assert float(record["epsilon"]) <= 1.0 and record["centre"] == "initializer"
    assert str(tmp_path) not in " ".join(record.values())
    assert first.spent_epsilon == pytest.approx(plan.epsilon)

    again = release_embeddings(
        eset, plan=plan, clip_norm=0.5, name="mystyle", out_dir=out, ledger=ledger
    )
    assert again.reused and again.path == first.path
    assert again.spent_epsilon == first.spent_epsilon
    assert sorted(p.name for p in out.iterdir()) == ["mystyle.safetensors"]
    assert len(ledger.list_releases(eset.dataset_id)) == 1


def test_new_name_per_release_and_cli_refusal_before_spending(tmp_path, ledger):
    eset = make_set()
    out = tmp_path / "embeddings"
    plan = calibrate(0.5, 1e-3, eset.n, "full")
    kwargs = dict(clip_norm=0.5, out_dir=out, ledger=ledger, budget_epsilon=2.0)
    release_embeddings(eset, plan=plan, name="style", **kwargs)
    plan2 = calibrate(0.6, 1e-3, eset.n, "full")
    with pytest.raises(DpaggError, match="already exists"):
        release_embeddings(eset, plan=plan2, name="style", **kwargs)
    assert len(ledger.list_releases(eset.dataset_id)) == 1  # nothing spent
    second = release_embeddings(eset, plan=plan2, name="style", new_name_per_release=True, **kwargs)
    assert second.name == "style-2" and not second.reused
    # re-executing the identical node request finds its own file again, spends nothing
    third = release_embeddings(eset, plan=plan2, name="style", new_name_per_release=True, **kwargs)
    assert third.reused and third.name == "style-2"
    assert len(ledger.list_releases(eset.dataset_id)) == 2


def test_over_budget_is_refused_and_writes_nothing(tmp_path, ledger):
    eset = make_set()
    out = tmp_path / "embeddings"
    release_embeddings(
        eset,
        plan=calibrate(1.0, 1e-3, eset.n, "full"),
        clip_norm=0.5,
        name="a",
        out_dir=out,
        ledger=ledger,
    )
    with pytest.raises(BudgetExceeded):
        release_embeddings(
            eset,
            plan=calibrate(0.5, 1e-3, eset.n, "full"),
            clip_norm=0.5,
            name="b",
            out_dir=out,
            ledger=ledger,
        )
    assert not (out / "b.safetensors").exists()
    assert len(ledger.list_releases(eset.dataset_id)) == 1


@pytest.mark.parametrize(
    ("name", "centre", "message"),
    [("../evil", "initializer", "path separator"), ("ok", "median", "centre")],
)
def test_bad_requests_spend_nothing(tmp_path, ledger, name, centre, message):
    eset = make_set()
    with pytest.raises(DpaggError, match=message):
        release_embeddings(
            eset,
            plan=calibrate(1.0, 1e-3, eset.n, "full"),
            clip_norm=0.5,
            name=name,
            out_dir=tmp_path / "out",
            ledger=ledger,
            centre=centre,
        )
    assert ledger.list_releases() == []


def test_output_folder_that_is_a_file_spends_nothing(tmp_path, ledger):
    eset = make_set()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DpaggError, match="is a file"):
        release_embeddings(
            eset,
            plan=calibrate(1.0, 1e-3, eset.n, "full"),
            clip_norm=0.5,
            name="x",
            out_dir=blocker,
            ledger=ledger,
        )
    assert ledger.list_releases() == []


def test_release_is_centred_on_the_public_centre(tmp_path, ledger):
    """With huge data (n=4000) and tight clipping the release sits near centre + mean offset."""
    eset = make_set(n=4000, dim=8, seed=3)
    plan = calibrate(4.0, 1e-5, eset.n, "full")
    out = release_embeddings(
        eset, plan=plan, clip_norm=2.0, name="big", out_dir=tmp_path / "e", ledger=ledger
    )
    released = out.vectors["emb_params"].double().numpy().ravel()
    target = eset.flat().mean(axis=0)  # all rows are within C of the centre: no clipping bias
    sigma = plan.noise_std(2.0)
    assert np.max(np.abs(released - target)) < 6 * sigma + 1e-6


def test_check_public_centre_inputs(tmp_path: Path) -> None:
    """The front ends' cheap check of centre + public embeddings file (issue 19 item 3: one core
    function, used by DP Aggregate's validate_inputs): None when they go together."""
    from dpagg_core.aggregate.release import check_public_centre_inputs as check

    f = tmp_path / "pub.safetensors"
    f.write_bytes(b"x")
    assert check("initializer", "") is None and check("origin", None) is None
    assert check("public_mean", str(f)) is None
    assert "use one of" in check("middle", "")
    assert "needs public_embeddings_file" in check("public_mean", "  ")
    assert "does not exist" in check("public_mean", str(tmp_path / "none.safetensors"))
    assert "only used with centre=public_mean" in check("origin", str(f))


def test_folder_fingerprint_follows_the_listing(tmp_path: Path) -> None:
    import os

    from dpagg_core.io.files import folder_fingerprint

    (tmp_path / "a.png").write_bytes(b"1")
    first = folder_fingerprint(tmp_path, "k")
    assert folder_fingerprint(tmp_path, "k") == first != folder_fingerprint(tmp_path, "other")
    os.rename(tmp_path / "a.png", tmp_path / "b.png")
    assert folder_fingerprint(tmp_path, "k") != first
    with pytest.raises(OSError):
        folder_fingerprint(tmp_path / "missing", "k")
