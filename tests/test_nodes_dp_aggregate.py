"""The DP Aggregate node (``nodes/dp_aggregate.py``), ComfyUI absent: releases, refusals, the
noise, a public basis, post-processing and the public-mean centre.
Shared helpers: ``tests/nodes_fixtures.py``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from nodes_fixtures import (
    aggregate,
    ti_set,
)

from dpagg_core.errors import BudgetExceeded, DpaggError
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.io.released_file import read_released
from dpagg_core.privacy import accountant, calibration
from dpagg_core.privacy.ledger import Ledger


def clip_set(n=5, dim=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    e = torch.nn.functional.normalize(torch.randn((n, 1, dim), generator=g), dim=-1)
    return EmbeddingSet(
        vectors={"image_embeds": e},
        kind="clip_image",
        model_family="clip_vision",
        base_model_id="test-vision",
        dataset_id="ds-clip0000000000000000000000000000",
    )


def test_aggregate_releases_once_and_reexecution_spends_nothing(pack, comfy_base):
    eset = ti_set(n=6)
    plan = calibration.calibrate(1.0, 1e-5, 6, "full")
    out = aggregate(pack, eset, plan, budget_epsilon=3.0)
    text, vision = out.args
    assert text == "embedding:mystyle"
    assert isinstance(vision, pack["ExecutionBlocker"])  # no CLIP_VISION_OUTPUT for TI sets
    path = comfy_base / "models" / "embeddings" / "mystyle.safetensors"
    tensors, record = read_released(path)
    assert set(tensors) == {"emb_params"} and tuple(tensors["emb_params"].shape) == (1, 16)
    assert float(record["epsilon"]) == plan.epsilon and record["n"] == "6"
    ledger_file = comfy_base / "user" / "dpagg" / "ledger.sqlite"
    assert ledger_file.is_file()  # the ledger lives in ComfyUI's user directory
    ledger = Ledger(ledger_file)
    assert len(ledger.list_releases()) == 1

    again = aggregate(pack, eset, plan, budget_epsilon=3.0)  # ComfyUI re-executes the node
    assert again.args[0] == "embedding:mystyle"
    assert again.ui["dpagg"][0]["reused"] is True
    assert len(ledger.list_releases()) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["mystyle.safetensors"]
    assert ledger.status(eset.dataset_id)["spent"]["epsilon"] == pytest.approx(plan.epsilon)

    # A new request (another name) is a new release under a NEW file name (prompt caches).
    third = aggregate(pack, eset, plan, budget_epsilon=3.0, name="mystyle")
    assert third.args[0] == "embedding:mystyle"  # identical request again: reused
    other = aggregate(pack, eset, plan, budget_epsilon=3.0, clip_norm=0.5)
    assert other.args[0] == "embedding:mystyle-2"
    assert len(ledger.list_releases()) == 2
    status = other.ui["dpagg"][0]
    spent = ledger.status(eset.dataset_id)["spent"]["epsilon"]
    assert plan.epsilon < spent <= 2 * plan.epsilon + 1e-9  # basic or (tighter) PLD composition
    assert status["spent"]["epsilon"] == spent and status["budget"]["epsilon"] == 3.0
    assert status["remaining"]["epsilon"] == pytest.approx(3.0 - spent)


def test_aggregate_over_budget_is_refused_before_anything_is_spent(pack, comfy_base):
    eset = ti_set(n=6)
    plan = calibration.calibrate(2.0, 1e-5, 6, "full")
    first = aggregate(pack, eset, plan, budget_epsilon=2.4).ui["dpagg"][0]
    # two such releases compose to more than 2.4 (a Gaussian's epsilon grows ~sqrt(2)-fold):
    assert first["next_release_exceeds"] is True and first["warning"] is True
    assert any("WARNING" in line for line in first["lines"])
    ledger = Ledger(comfy_base / "user" / "dpagg" / "ledger.sqlite")
    before = ledger.status(eset.dataset_id)
    with pytest.raises(BudgetExceeded, match="budget"):
        aggregate(pack, eset, plan, budget_epsilon=2.4, name="another")
    assert ledger.status(eset.dataset_id) == before
    files = sorted(p.name for p in (comfy_base / "models" / "embeddings").iterdir())
    assert files == ["mystyle.safetensors"]


def test_aggregate_refuses_a_plan_for_another_n(pack, comfy_base):
    eset = ti_set(n=6)
    plan = calibration.calibrate(1.0, 1e-5, 8, "full")
    with pytest.raises(DpaggError, match="n=8"):
        aggregate(pack, eset, plan)
    assert not (comfy_base / "models" / "embeddings").exists()
    assert Ledger(comfy_base / "user" / "dpagg" / "ledger.sqlite").list_releases() == []


def test_aggregate_noise_matches_the_plan(pack, comfy_base):
    """Released = clipped mean + N(0, sigma^2): the residual's std per coordinate matches sigma
    within 5 standard errors (D = 2000 coordinates, one release, generous budget)."""
    n, dim = 10, 2000
    g = torch.Generator().manual_seed(3)
    centre = torch.zeros((1, dim))
    vecs = 0.001 * torch.randn((n, 1, dim), generator=g)  # norms ~0.045 < C: no clipping
    eset = EmbeddingSet(
        vectors={"emb_params": vecs},
        kind="textual_inversion",
        model_family="sd1",
        centre={"emb_params": centre},
        dataset_id="ds-noise000000000000000000000000000",
    )
    plan = accountant.epsilon_for(1.0, 1e-5, n, "full")
    text, _ = aggregate(pack, eset, plan, clip_norm=1.0, budget_epsilon=50.0).args
    released, _ = read_released(comfy_base / "models" / "embeddings" / "mystyle.safetensors")
    resid = released["emb_params"].double().reshape(-1) - vecs.double().mean(0).reshape(-1)
    sigma = plan.noise_std(1.0)
    sd = float(resid.std())
    # std of a sample std of D normals ~ sigma / sqrt(2D)
    assert abs(sd - sigma) < 5 * sigma / math.sqrt(2 * dim)
    assert abs(float(resid.mean())) < 5 * sigma / math.sqrt(dim)


def test_aggregate_clip_image_set_gives_clip_vision_output(pack, comfy_base):
    eset = clip_set(n=5, dim=12)
    plan = calibration.calibrate(3.0, 1e-5, 5, "full")
    text, vision = aggregate(
        pack, eset, plan, centre="origin", mode="normalize", name="cs", budget_epsilon=5.0
    ).args
    assert text == "cs"
    path = comfy_base / "output" / "dpagg_clip" / "cs.safetensors"
    tensors, record = read_released(path)
    assert tuple(vision.image_embeds.shape) == (1, 12)
    assert torch.equal(vision.image_embeds, tensors["image_embeds"].reshape(1, 12))
    assert record["centre"] == "origin" and record["clip_mode"] == "normalize"
    assert not (comfy_base / "models" / "embeddings").exists()  # not a prompt embedding


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"name": "../evil"}, "name"),
        ({"name": ""}, "name"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"centre": "mean_of_images"}, "centre"),
        ({"budget_delta": 1.5}, "budget_delta"),
    ],
)
def test_aggregate_validate_inputs(pack, change, needle):
    kw = {
        "clip_norm": 1.0,
        "centre": "initializer",
        "name": "ok_name",
        "mode": "clip",
        "budget_epsilon": 0.0,
        "budget_delta": 0.0,
        "embedding_set": None,
        "plan": None,
    }
    assert pack["dp_aggregate"].DPAggregate.validate_inputs(**kw) is True
    msg = pack["dp_aggregate"].DPAggregate.validate_inputs(**(kw | change))
    assert isinstance(msg, str) and needle in msg


def _basis(pack, k=4, v=1, dim=16, model_id="test-model", seed=3):
    from dpagg_core.aggregate.subspace import PublicBasis

    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, k)))
    return PublicBasis(
        blocks={"emb_params": q},
        vectors=v,
        kind="public_embeddings",
        model_family="sd1",
        base_model_id=model_id,
        centred=True,
        typical_norms={"emb_params": 1.0},
        rows=40,
    )


def test_aggregate_with_a_basis_releases_in_its_span_and_records_it(pack, comfy_base):
    eset = ti_set(n=8, v=1, dim=16)
    basis = _basis(pack, k=4)
    plan = calibration.calibrate(2.0, 1e-5, 8, "full")
    out = aggregate(pack, eset, plan, basis=basis, budget_epsilon=5.0)
    payload = out.ui["dpagg"][0]
    name = payload["name"]
    tensors, record = read_released(comfy_base / "models" / "embeddings" / f"{name}.safetensors")
    assert record["mechanism"] == "dpagg-gaussian-mean-subspace"
    assert record["basis_sha256"] == basis.sha256 and record["basis_dim"] == "4"
    assert record["basis_kind"] == "public_embeddings" and record["basis_k"] == "4"
    delta = tensors["emb_params"].double().reshape(-1).numpy() - eset.flat_centre()
    assert np.linalg.norm(delta) > 0
    outside = delta - basis.U @ (basis.U.T @ delta)
    assert np.linalg.norm(outside) <= 1e-6 * (1 + np.linalg.norm(tensors["emb_params"].numpy()))
    # the UI shows the basis and the noise-norm reduction sqrt(K/D) = 0.5 (public values)
    assert payload["basis"]["K"] == 4 and payload["basis"]["D"] == 16
    assert payload["basis"]["noise_norm_ratio"] == pytest.approx(0.5)
    assert any("noise on K = 4 of D = 16" in line and "x0.50" in line for line in payload["lines"])
    json.dumps(out.ui)


def test_aggregate_refuses_a_basis_for_another_model_before_spending(pack, comfy_base):
    eset = ti_set(n=6)
    plan = calibration.calibrate(1.0, 1e-5, 6, "full")
    for bad, needle in (
        (_basis(pack, model_id="comfyui:sd1:ffffffffffffffff"), "base model"),
        (_basis(pack, v=2), "D=32"),
        ("not a basis", "Public Basis"),
    ):
        with pytest.raises(DpaggError, match=needle):
            aggregate(pack, eset, plan, basis=bad, budget_epsilon=5.0)
    assert Ledger(pack["common"].ledger_path()).list_releases() == []  # nothing spent
    assert not list((comfy_base / "models" / "embeddings").glob("*.safetensors"))


def test_aggregate_postprocessing_is_recorded_and_shown(pack, comfy_base):
    eset = ti_set(n=6)
    plan = calibration.calibrate(1.0, 1e-5, 6, "full")
    out = aggregate(pack, eset, plan, postprocess="js", budget_epsilon=3.0)
    payload = out.ui["dpagg"][0]
    _, record = read_released(
        comfy_base / "models" / "embeddings" / f"{payload['name']}.safetensors"
    )
    assert record["postprocess"] == "js" and record["postprocess_js_k"] == "16"
    assert 0.0 <= float(record["postprocess_js_factor"]) <= 1.0
    assert payload["postprocess"] == "js"
    assert any(
        line.startswith("post-processing: js (James-Stein factor") for line in payload["lines"]
    )
    validate = pack["dp_aggregate"].DPAggregate.validate_inputs
    good = {"name": "x", "clip_norm": 1.0, "centre": "initializer", "mode": "clip"}
    assert validate(**good, postprocess="js+norm") is True
    assert "postprocess" in validate(**good, postprocess="bogus")
    # public_mean needs its PUBLIC embeddings file (tests below)
    assert "public_embeddings_file" in validate(**(good | {"centre": "public_mean"}))


def _public_file(pack, folder: Path, eset: EmbeddingSet, n=10, seed=11, model_id=None) -> Path:
    """PUBLIC per-image embeddings matching ``eset`` (model, centre, initializer), saved as
    ``dpagg public-basis --save-public-embeddings`` writes them (tagged under the pack's
    ledger)."""
    from dpagg_core.aggregate.subspace import PublicEmbeddings, save_public_embeddings

    g = torch.Generator().manual_seed(seed)
    centre = eset.centre["emb_params"]
    public = PublicEmbeddings(
        vectors={"emb_params": centre + 0.2 * torch.randn((n, *centre.shape), generator=g)},
        model_family=eset.model_family,
        base_model_id=eset.base_model_id if model_id is None else model_id,
        centre={"emb_params": centre.clone()},
        initializer=eset.initializer,
    )
    key = pack["common"].comfy_ledger().identity_key()
    return save_public_embeddings(public, folder / "public.safetensors", key=key)


def test_aggregate_around_the_public_mean_records_it_as_the_library_does(
    pack, comfy_base, tmp_path
):
    """centre=public_mean + public_embeddings_file: the release clips around the PUBLIC mean;
    its record names ``centre: public_mean`` and the centre's hash, with the same public fields
    the library's release_embeddings gives for the same inputs (the noise aside). An identical
    re-execution (ComfyUI cache eviction) spends nothing."""
    from dpagg_core.aggregate.release import release_embeddings
    from dpagg_core.aggregate.subspace import load_public_embeddings, public_mean_centre
    from dpagg_core.privacy.mechanism import centre_hash

    eset = ti_set(n=8)
    pfile = _public_file(pack, tmp_path / "public", eset)
    node = pack["dp_aggregate"].DPAggregate
    good = {"name": "pm", "clip_norm": 0.5, "centre": "public_mean", "mode": "clip"}
    assert node.validate_inputs(**good, public_embeddings_file=str(pfile)) is True
    plan = calibration.calibrate(2.0, 1e-5, 8, "full")
    kw = {"centre": "public_mean", "clip_norm": 0.5, "name": "pm", "budget_epsilon": 5.0}
    out = aggregate(pack, eset, plan, public_embeddings_file=f"  {pfile}  ", **kw)
    payload = out.ui["dpagg"][0]
    tensors, record = read_released(
        comfy_base / "models" / "embeddings" / f"{payload['name']}.safetensors"
    )
    pc = public_mean_centre(pfile)
    assert record["centre"] == "public_mean" and record["centre_sha256"] == pc.sha256
    assert pc.sha256 != centre_hash(eset.flat_centre())  # not the initializer
    assert payload["centre"] == {"kind": "public_mean", "sha256": pc.sha256}
    assert any(line.startswith("centre public_mean: sha256 ") for line in payload["lines"])
    json.dumps(out.ui)
    # the library, same inputs, its own ledger: the same public record (noise aside). The file
    # is tagged under the pack's ledger, so it is refused by path under another ledger ...
    with pytest.raises(DpaggError, match="authentication check"):
        release_embeddings(
            eset, plan=plan, clip_norm=0.5, name="pm", out_dir=tmp_path / "lib",
            ledger=Ledger(tmp_path / "lib.sqlite"), centre="public_mean", public_centre=pfile,
        )  # fmt: skip
    # ... and a caller who trusts it passes its loaded embeddings (trusted-caller API).
    lib = release_embeddings(
        eset,
        plan=plan,
        clip_norm=0.5,
        name="pm",
        out_dir=tmp_path / "lib",
        ledger=Ledger(tmp_path / "lib.sqlite"),
        centre="public_mean",
        budget_epsilon=5.0,
        public_centre=load_public_embeddings(pfile),
    )
    same = ("centre", "centre_sha256", "clip_norm", "clip_mode", "sigma", "sensitivity", "n")
    assert {k: record[k] for k in same} == {k: lib.record[k] for k in same}
    assert tensors["emb_params"].shape == lib.vectors["emb_params"].shape
    # ComfyUI re-executing the identical request: the recorded release, nothing spent
    again = aggregate(pack, eset, plan, public_embeddings_file=str(pfile), **kw)
    assert again.ui["dpagg"][0]["reused"]
    assert len(Ledger(pack["common"].ledger_path()).list_releases()) == 1


def test_aggregate_public_mean_without_its_file_fails_validation_and_spends_nothing(
    pack, comfy_base, tmp_path
):
    eset = ti_set(n=6)
    plan = calibration.calibrate(1.0, 1e-5, 6, "full")
    validate = pack["dp_aggregate"].DPAggregate.validate_inputs
    good = {"name": "x", "clip_norm": 1.0, "mode": "clip", "budget_epsilon": 0.0}
    for blank in ({}, {"public_embeddings_file": ""}, {"public_embeddings_file": "  "}):
        msg = validate(**good, centre="public_mean", **blank)
        assert isinstance(msg, str) and "public_embeddings_file" in msg
        assert "--save-public-embeddings" in msg and "PUBLIC" in msg
    missing = tmp_path / "nope.safetensors"
    assert "does not exist" in validate(
        **good, centre="public_mean", public_embeddings_file=str(missing)
    )
    pfile = _public_file(pack, tmp_path / "public", eset)
    for other in ("initializer", "origin"):  # a file with another centre: said, not ignored
        msg = validate(**good, centre=other, public_embeddings_file=str(pfile))
        assert isinstance(msg, str) and "only used with centre=public_mean" in msg
    # execute (validation bypassed) refuses the same, before the ledger is touched
    for centre, file, needle in (
        ("public_mean", "", "public_embeddings_file"),
        ("public_mean", str(missing), "does not exist"),
        ("initializer", str(pfile), "only used with centre=public_mean"),
    ):
        with pytest.raises(DpaggError, match=needle):
            aggregate(pack, eset, plan, centre=centre, public_embeddings_file=file)
    assert Ledger(pack["common"].ledger_path()).list_releases() == []  # nothing spent
    assert not (comfy_base / "models" / "embeddings").exists()


def test_aggregate_refuses_private_or_foreign_public_embeddings_before_spending(
    pack, comfy_base, tmp_path
):
    """A PRIVATE file (the per-image embeddings of the private set, saved as such) or public
    embeddings of another model are refused by the core before the ledger reserves anything."""
    from dpagg_core.io.private_file import save_private

    eset = ti_set(n=6)
    plan = calibration.calibrate(1.0, 1e-5, 6, "full")
    private = save_private(eset, tmp_path / "vault" / "set.safetensors", key=bytes(range(32)))
    foreign = _public_file(pack, tmp_path / "other", eset, model_id="comfyui:sd1:ffffffffffffffff")
    for bad, needle in ((private, "PRIVATE"), (foreign, "model")):
        with pytest.raises(DpaggError, match=needle):
            aggregate(
                pack,
                eset,
                plan,
                centre="public_mean",
                public_embeddings_file=str(bad),
                budget_epsilon=5.0,
            )
    assert Ledger(pack["common"].ledger_path()).list_releases() == []  # nothing spent
    assert not (comfy_base / "models" / "embeddings").exists()


def test_lower_budget_on_aggregate_says_what_happened(pack, comfy_base):
    """budget_epsilon below the recorded budget: the node says it was not applied to a reused
    release, and that the recorded budget (the "/ 3" shown) is unchanged."""
    eset = ti_set(n=6)
    plan = calibration.calibrate(1.0, 1e-5, 6, "full")
    aggregate(pack, eset, plan, budget_epsilon=3.0)
    again = aggregate(pack, eset, plan, budget_epsilon=1.5).ui["dpagg"][0]
    assert again["reused"] is True and again["budget"]["epsilon"] == 3.0
    text = "\n".join(again["lines"])
    assert "budget_epsilon=1.5 was not applied: this identical request was released before" in text
    assert "budget_epsilon=1.5 is below the recorded budget 3" in text and "stays 3" in text
    new = aggregate(pack, eset, plan, budget_epsilon=1.5, clip_norm=0.5).ui["dpagg"][0]
    assert new["reused"] is False and "was not applied" not in "\n".join(new["lines"])
    assert "caps new releases of this node only" in "\n".join(new["lines"])


def test_first_release_needs_a_deliberate_budget(pack, comfy_base):
    """Issue 20 item 10: budget_epsilon 0 on an image set's first release is refused before
    anything is spent (it would have made this one release the whole budget); with a budget the
    same node releases, and afterwards 0 keeps the recorded budget."""
    eset = ti_set(n=6)
    plan = calibration.calibrate(1.0, 1e-5, 6, "full")
    with pytest.raises(DpaggError, match="budget_epsilon \\(on this node\\): choose the total"):
        aggregate(pack, eset, plan)
    assert Ledger(pack["common"].ledger_path()).list_releases() == []
    aggregate(pack, eset, plan, budget_epsilon=3.0)
    aggregate(pack, eset, plan, name="again", clip_norm=0.5)  # recorded budget 3 is kept
    assert len(Ledger(pack["common"].ledger_path()).list_releases()) == 2
