"""The public side of the graph (issue 21 items 1 and 3), ComfyUI absent: Load Public Images ->
Per-Image TI -> Public Style (basis, public-mean centre, C) -> DP Aggregate, and Rehearse on
Public Images. Training runs on the tiny diffusers backend; the ledger, the release and the
rehearsal are the real core. Shared helpers: ``tests/nodes_fixtures.py``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from nodes_fixtures import TI_WIDGETS, acc_kwargs, aggregate
from PIL import Image

from dpagg_core.errors import DpaggError
from dpagg_core.io.released_file import read_released
from dpagg_core.privacy.identity import image_ids_for
from dpagg_core.privacy.ledger import Ledger


def _write_styles(root: Path, styles: int = 3, per_style: int = 3, size: int = 32) -> None:
    """``styles`` subfolders of PUBLIC pictures, each style its own colour cast."""
    rng = np.random.default_rng(7)
    for s in range(styles):
        folder = root / f"style{s}"
        folder.mkdir(parents=True)
        for i in range(per_style):
            base = np.zeros((size, size, 3))
            base[..., s % 3] = 150
            arr = (base + rng.integers(0, 100, (size, size, 3))).astype(np.uint8)
            Image.fromarray(arr).save(folder / f"p{i}.png")


@pytest.fixture
def public_folder(comfy_base):
    root = comfy_base / "input" / "pub"
    _write_styles(root)
    return root


@pytest.fixture
def counted_public(pack, monkeypatch):
    """Public per-image training made NON-deterministic on purpose (as on a GPU), counted."""
    module = pack["per_image_ti"]
    real, calls = module.train_public_embeddings, []

    def noisy(*args, **kwargs):
        calls.append(1)
        public = real(*args, **kwargs)
        public.vectors = {k: t + 1e-3 * torch.randn_like(t) for k, t in public.vectors.items()}
        return public

    monkeypatch.setattr(module, "train_public_embeddings", noisy)
    return calls


def _public_job(pack, folder: str = "pub"):
    loaded = pack["load_public_images"].LoadPublicImages.execute(folder=folder, resolution=32)
    with torch.inference_mode():
        out = pack["per_image_ti"].PerImageTI.execute(
            model=["M"], clip=["C"], vae=["V"], images=[loaded.args[0]], **TI_WIDGETS
        )
    return loaded, out


def _private_job(pack, comfy_base):
    from image_kinds import write_mixed_sizes

    write_mixed_sizes(comfy_base / "input" / "mine")
    loaded = pack["load_private_images"].LoadPrivateImages.execute(folder="mine", resolution=32)
    with torch.inference_mode():
        job = (
            pack["per_image_ti"]
            .PerImageTI.execute(
                model=["M"], clip=["C"], vae=["V"], images=[loaded.args[0]], **TI_WIDGETS
            )
            .args[0]
        )
    plan = pack["privacy_accountant"].PrivacyAccountant.execute(**acc_kwargs(), embedding_set=job)
    return job, plan.args[0]


def _style(pack, k: int = 0):
    _, ti_out = _public_job(pack)
    with torch.inference_mode():
        return pack["public_style"].PublicStyle.execute(
            public_embedding_set=ti_out.args[0], k=k, clip_quantile=0.5
        )


def test_load_public_images_reads_style_subfolders_and_refuses_private_pictures(
    pack, comfy_base, public_folder
):
    """One subfolder per style (the groups k=auto holds out); nothing registered; a picture the
    ledger knows as private (a copy of a loaded private file) is refused by name."""
    ledger = Ledger(comfy_base / "user" / "dpagg" / "ledger.sqlite")
    out = pack["load_public_images"].LoadPublicImages.execute(folder="pub", resolution=32)
    public = out.args[0]
    assert public.count == 9 and public.styles == ("style0", "style1", "style2")
    assert public.groups == (0, 0, 0, 1, 1, 1, 2, 2, 2)
    assert "9 PUBLIC images" in out.ui["dpagg"][0]["lines"][0]
    assert "tensor" not in repr(public)
    assert ledger.dataset_ids() == []  # public pictures are not registered
    ids = image_ids_for(public.digests, key=ledger.identity_key())
    assert ledger.private_pictures(ids) == []
    from image_kinds import write_mixed_sizes

    private = write_mixed_sizes(comfy_base / "input" / "mine")
    pack["load_private_images"].LoadPrivateImages.execute(folder="mine", resolution=32)
    shutil.copy(private[0], public_folder / "style1" / "copied.png")
    with pytest.raises(DpaggError, match="copied.png"):
        pack["load_public_images"].LoadPublicImages.execute(folder="pub", resolution=32)


def test_a_public_job_is_never_released_or_planned(pack, comfy_base, public_folder, tiny_backend):
    """Per-Image TI marks Load Public Images' job public; DP Aggregate and the Privacy
    Accountant refuse it (nothing spent, nothing written), and Public Style refuses a private
    job."""
    _, ti_out = _public_job(pack)
    job = ti_out.args[0]
    assert job.public is not None and "PUBLIC images" in json.dumps(ti_out.ui)
    plan = pack["privacy_accountant"].PrivacyAccountant.execute(**acc_kwargs(n=9)).args[0]
    with pytest.raises(DpaggError, match="PUBLIC images"):
        aggregate(pack, job, plan, budget_epsilon=10.0)
    with pytest.raises(DpaggError, match="PUBLIC images"):
        pack["privacy_accountant"].PrivacyAccountant.execute(**acc_kwargs(), embedding_set=job)
    private_job, _ = _private_job(pack, comfy_base)
    with pytest.raises(DpaggError, match="Load Public Images"):
        pack["public_style"].PublicStyle.execute(
            public_embedding_set=private_job, k=0, clip_quantile=0.5
        )
    assert Ledger(pack["common"].ledger_path()).list_releases() == []
    assert not (comfy_base / "models" / "embeddings").exists()


def test_public_style_gives_basis_centre_and_c_and_the_release_is_free_after_a_restart(
    pack, comfy_base, public_folder, tiny_backend, counted_public, counted_training
):
    """Public Style chooses k on the public styles, outputs the basis, the public embeddings and
    C; DP Aggregate releases with them (centre public_mean, forecast from the public styles).
    After a "restart" (fresh jobs, public training not bit-reproducible) the public embeddings
    come from the disk cache, so the identical release is answered from the ledger: nothing
    trained, nothing spent."""
    style = _style(pack)
    basis, build, clip_norm = style.args
    ui = style.ui["dpagg"][0]
    assert counted_public == [1] and ui["cached"] is False
    assert build.choice is not None and basis.k == build.choice.k and basis.vectors == 2
    assert clip_norm > 0 and ui["clip_norm"] == clip_norm and 0 < ui["rho"] <= 1
    assert any("chosen on 3 PUBLIC styles" in line for line in ui["lines"])
    cache = comfy_base / "user" / "dpagg" / "public_embeddings"
    assert len(list(cache.glob("*.safetensors"))) == 1

    job, plan = _private_job(pack, comfy_base)
    kw = dict(
        basis=basis,
        public_embeddings=build,
        clip_norm=clip_norm,
        centre="public_mean",
        budget_epsilon=10.0,
    )
    with torch.inference_mode():
        first = aggregate(pack, job, plan, **kw)
    info = first.ui["dpagg"][0]
    assert info["reused"] is False and counted_training == [1]
    assert info["forecast"]["k"] == basis.dim
    assert info["forecast"]["rho_source"] == "measured on Public Style's images"
    assert any(line.startswith("forecast: signal-to-noise") for line in info["lines"])
    record = read_released(comfy_base / "models" / "embeddings" / "mystyle.safetensors")[1]
    assert record["centre"] == "public_mean" and record["basis_sha256"] == basis.sha256
    ledger = Ledger(pack["common"].ledger_path())
    spent = ledger.status(job.dataset_id)["spent"]["epsilon"]

    again = _style(pack)  # a restart: every node runs afresh
    assert counted_public == [1] and again.ui["dpagg"][0]["cached"] is True
    assert again.args[0].sha256 == basis.sha256 and again.args[2] == clip_norm
    job2, plan2 = _private_job(pack, comfy_base)
    kw |= dict(basis=again.args[0], public_embeddings=again.args[1], clip_norm=again.args[2])
    with torch.inference_mode():
        second = aggregate(pack, job2, plan2, **kw)
    assert second.ui["dpagg"][0]["reused"] is True and counted_training == [1]
    assert ledger.status(job.dataset_id)["spent"]["epsilon"] == pytest.approx(spent)
    assert len(ledger.list_releases()) == 1


def test_public_embeddings_input_goes_with_centre_public_mean_only(
    pack, comfy_base, public_folder, tiny_backend
):
    """Linked public embeddings with another centre, or with a file too: refused before the
    ledger (nothing spent). validate_inputs sees the link in the queued prompt."""
    _, build, clip_norm = _style(pack, k=2).args
    job, plan = _private_job(pack, comfy_base)
    for kw, needle in (
        ({"centre": "initializer"}, "choose centre=public_mean"),
        ({"centre": "public_mean", "public_embeddings_file": "x.safetensors"}, "keep one"),
    ):
        with pytest.raises(DpaggError, match=needle):
            aggregate(pack, job, plan, public_embeddings=build, budget_epsilon=10.0, **kw)
    with pytest.raises(DpaggError, match="Public Style's public_embeddings"):
        aggregate(pack, job, plan, centre="public_mean", budget_epsilon=10.0)
    assert Ledger(pack["common"].ledger_path()).list_releases() == []
    node = pack["dp_aggregate"].DPAggregate
    good = {"name": "x", "mode": "clip", "budget_epsilon": 1.0, "centre": "public_mean"}
    assert "public_embeddings_file" in node.validate_inputs(**good, clip_norm=1.0)
    # ComfyUI hands validate_inputs a linked input as None (an unlinked optional one is absent)
    assert node.validate_inputs(**good, public_embeddings=None, clip_norm=None) is True


def test_rehearse_writes_the_grid_prompts_and_spends_nothing(
    pack, comfy_base, public_folder, tiny_backend
):
    """Rehearse draws n public pictures, writes the non-private mean and draws x 3 epsilons
    under models/embeddings/dpagg_rehearsal, outputs one prompt per grid picture (list output)
    with labels, shows the forecast; the ledger stays empty. A private job is refused."""
    style = _style(pack, k=2)
    _, ti_out = _public_job(pack)
    plan = pack["privacy_accountant"].PrivacyAccountant.execute(**acc_kwargs(n=4)).args[0]
    with torch.inference_mode():
        out = pack["rehearse"].Rehearse.execute(
            public_embedding_set=ti_out.args[0],
            plan=plan,
            n=0,
            clip_norm=style.args[2],
            centre="public_mean",
            draws=2,
            pick_seed=0,
            name="trial",
            mode="clip",
            basis=style.args[0],
            public_embeddings=style.args[1],
        )
    prompts, labels = out.args
    assert len(prompts) == len(labels) == 2 + 3 * 2
    assert prompts[0] == "" and labels[:2] == ["without embedding", "non-private mean"]
    assert labels[2] == f"epsilon {plan.epsilon / 2:.3g}, draw 1"
    root = comfy_base / "models" / "embeddings"
    for prompt in prompts[1:]:
        assert prompt.startswith("embedding:dpagg_rehearsal/trial/")
        path = root / (prompt.removeprefix("embedding:") + ".safetensors")
        tensors, record = read_released(path)
        assert record["rehearsal"].startswith("public images only")
        assert tuple(tensors["emb_params"].shape)[0] == 2  # vectors per token
    summary = out.ui["dpagg"][0]["rehearsal"]
    assert summary["n"] == 4 and summary["available"] == 9
    assert summary["forecast"]["rho_source"] == "measured on Public Style's images"
    assert Ledger(pack["common"].ledger_path()).list_releases() == []
    assert not list(root.glob("*.safetensors"))  # nothing beside the released embeddings
    job, _ = _private_job(pack, comfy_base)
    with pytest.raises(DpaggError, match="Load Public Images"):
        pack["rehearse"].Rehearse.execute(
            public_embedding_set=job,
            plan=plan,
            n=0,
            clip_norm=1.0,
            centre="initializer",
            draws=1,
            pick_seed=0,
            name="trial",
            mode="clip",
        )


def test_dp_aggregate_warns_when_the_public_side_was_trained_otherwise(
    pack, comfy_base, public_folder, tiny_backend
):
    """The two Per-Image TI nodes of the template are set by hand: DP Aggregate names the
    settings in which they differ (public values; a utility warning, the release still runs),
    and says nothing when they agree."""
    basis, build, clip_norm = _style(pack, k=2).args
    kw = dict(basis=basis, public_embeddings=build, clip_norm=clip_norm, centre="public_mean")
    job, plan = _private_job(pack, comfy_base)
    with torch.inference_mode():
        same = aggregate(pack, job, plan, budget_epsilon=10.0, **kw)
    assert not [x for x in same.ui["dpagg"][0]["lines"] if "other settings" in x]
    from image_kinds import write_mixed_sizes

    write_mixed_sizes(comfy_base / "input" / "mine2", seed=3)
    loaded = pack["load_private_images"].LoadPrivateImages.execute(folder="mine2", resolution=32)
    widgets = TI_WIDGETS | {"steps": [3], "learning_rate": [0.02]}
    with torch.inference_mode():
        ti_node = pack["per_image_ti"].PerImageTI
        images = [loaded.args[0]]
        models = {"model": ["M"], "clip": ["C"], "vae": ["V"]}
        other = ti_node.execute(**models, images=images, **widgets).args[0]
        plan2 = pack["privacy_accountant"].PrivacyAccountant.execute(
            **acc_kwargs(), embedding_set=other
        )
        out = aggregate(pack, other, plan2.args[0], budget_epsilon=10.0, name="other", **kw)
    (line,) = [x for x in out.ui["dpagg"][0]["lines"] if "other settings" in x]
    assert "steps 2 vs 3" in line and "learning_rate 0.01 vs 0.02" in line
    assert out.ui["dpagg"][0]["reused"] is False  # a warning, not a refusal
