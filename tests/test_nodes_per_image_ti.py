"""The Per-Image TI node and its deferred training job (``nodes/per_image_ti.py``), ComfyUI
absent: training on a tiny diffusers backend, cancel, the ledger answering before training.
Shared helpers: ``tests/nodes_fixtures.py``."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from nodes_fixtures import (
    TI_WIDGETS,
    acc_kwargs,
    aggregate,
    comfy_images,
)

from dpagg_core.errors import BudgetExceeded, DpaggError
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.io.released_file import read_released
from dpagg_core.privacy import calibration
from dpagg_core.privacy.ledger import Ledger


def test_per_image_ti_trains_one_embedding_per_image(pack, comfy_base, tiny_backend):
    """Per-Image TI hands on a deferred job (it trains nothing itself); materializing it trains
    one embedding per image, once."""
    imgs = comfy_images(3)
    with torch.inference_mode():  # ComfyUI executes nodes in inference mode
        out = pack["per_image_ti"].PerImageTI.execute(
            model=["M"], clip=["C"], vae=["V"], images=[imgs[:2], imgs[2:]], **TI_WIDGETS
        )
    job = out.args[0]
    assert (
        isinstance(job, pack["per_image_ti"].TrainingJob) and job.n == 3 and job.trained_here == 0
    )
    assert pack["utils"].UPDATES == []  # nothing trained yet
    assert "deferred" in json.dumps(out.ui)
    assert "private" in repr(job) and "tensor" not in repr(job)
    with torch.inference_mode():  # e.g. a node that needs the set itself
        eset = job.materialize()
        assert job.materialize() is eset and job.trained_here == 1  # trained once
    assert tiny_backend == [("M", "C", "V")] * 2  # checked by the node, then trained
    assert isinstance(eset, EmbeddingSet) and eset.n == 3 and eset.num_vectors == 2
    assert eset.kind == "textual_inversion" and eset.base_model_id == "tiny-test"
    assert eset.dataset_id == pack["common"].images_dataset_id(list(imgs))[0]
    assert not eset.vectors["emb_params"].is_inference()
    # trained: every row moved away from the public initializer centre
    moved = (eset.vectors["emb_params"] - eset.centre["emb_params"]).flatten(1).norm(dim=1)
    assert bool((moved > 0).all())
    # progress: steps x chunks (2 chunks of batch 2), each a cancel point
    assert pack["utils"].UPDATES[-1] == (4, 4)
    # the UI message holds public values only (no embedding values)
    text = json.dumps(out.ui)
    assert "one embedding each" in text
    for x in eset.vectors["emb_params"].flatten()[:20].tolist():
        assert repr(x)[:8] not in text


def test_per_image_ti_cancel_returns_nothing(pack, comfy_base, tiny_backend):
    job = (
        pack["per_image_ti"]
        .PerImageTI.execute(
            model=["M"], clip=["C"], vae=["V"], images=[comfy_images(2)], **TI_WIDGETS
        )
        .args[0]
    )
    pack["mm"].interrupt_current_processing(True)
    with pytest.raises(pack["mm"].InterruptProcessingException):
        job.materialize()
    assert pack["utils"].UPDATES == []  # cancelled before the first step
    assert job.trained_here == 0 and "trained=False" in repr(job)


def test_per_image_ti_validate_inputs(pack):
    ok = TI_WIDGETS | {"model": None, "clip": None, "vae": None, "images": None}
    assert pack["per_image_ti"].PerImageTI.validate_inputs(**ok) is True
    for change, needle in (
        ({"vectors": [9]}, "vectors"),
        ({"resolution": [30]}, "resolution"),
        ({"initializer": ["  "]}, "initializer"),
        ({"learning_rate": [0.0]}, "learning_rate"),
        ({"templates": ["poems"]}, "templates"),
    ):
        msg = pack["per_image_ti"].PerImageTI.validate_inputs(**(ok | change))
        assert isinstance(msg, str) and needle in msg, (change, msg)


def test_image_helpers(pack):
    a, b = comfy_images(2, 32, seed=1), comfy_images(1, 48, seed=2)
    flat = pack["common"]._flatten_images([a, b])
    assert [tuple(x.shape) for x in flat] == [(32, 32, 3), (32, 32, 3), (48, 48, 3)]
    with pytest.raises(DpaggError, match="resolution"):
        pack["common"].to_model_images(flat, 0)
    x = pack["common"].to_model_images(flat, 16)
    assert tuple(x.shape) == (3, 3, 16, 16) and float(x.min()) >= -1 and float(x.max()) <= 1
    # the dataset id ignores order and changes when one image changes
    ids = pack["common"].images_dataset_id(flat)[0], pack["common"].images_dataset_id(flat[::-1])[0]
    assert ids[0] == ids[1]
    changed = [flat[0].clone(), flat[1], flat[2]]
    changed[0][0, 0, 0] = 1.0 - changed[0][0, 0, 0]
    assert pack["common"].images_dataset_id(changed)[0] != ids[0]
    with pytest.raises(DpaggError, match="images"):
        pack["common"]._flatten_images([torch.zeros((2, 2))])


def test_dataset_id_matches_the_core_image_loader(pack):
    """ComfyUI images and the CLI's loader identify the same pictures alike (one budget)."""
    from dpagg_core.io.images import load_images

    imgs = (comfy_images(3, 40, seed=4) * 255).round() / 255  # 8-bit pictures, as ComfyUI loads
    imgs = torch.cat([imgs, torch.rand((3, 40, 24, 3))[:, :, :24].mul(255).round().div(255)], 2)
    assert tuple(imgs.shape) == (3, 40, 64, 3)  # non-square: width/height order matters
    core = load_images(imgs, resolution=16).dataset_id
    assert pack["common"].images_dataset_id(list(imgs))[0] == core


def test_per_image_ti_reports_setup_stages_before_the_first_step(
    pack, comfy_base, tiny_backend, monkeypatch, capsys
):
    """The bar sat at 0 through the whole setup: each stage (recording the model, preparing it,
    encoding each chunk's latents) is now sent to the node as progress text before it starts,
    and printed to the server log with a tqdm step line, as KSampler does."""
    sent = []
    updates = pack["utils"].UPDATES

    class FakeServer:
        def send_progress_text(self, text, node_id, sid=None):
            sent.append((text, node_id, len(updates)))

    monkeypatch.setitem(
        sys.modules, "server", SimpleNamespace(PromptServer=SimpleNamespace(instance=FakeServer()))
    )
    monkeypatch.setattr(
        pack["per_image_ti"].PerImageTI, "hidden", SimpleNamespace(unique_id="5", prompt={})
    )
    imgs = comfy_images(3)
    with torch.inference_mode():
        pack["per_image_ti"].PerImageTI.execute(
            model=["M"], clip=["C"], vae=["V"], images=[imgs], **TI_WIDGETS
        ).args[0].materialize()
    texts = [t for t, _, _ in sent]
    assert {n for _, n, _ in sent} == {"5"}
    assert texts[0].startswith("Per-Image TI: 3 images; recording the model's state")
    assert texts[1].startswith("Per-Image TI: preparing the model")
    assert "Per-Image TI: encoding latents (images 1-2 of 3)" in texts
    assert "Per-Image TI: encoding latents (images 3-3 of 3)" in texts
    assert texts[-1] == "Per-Image TI: done"
    first = texts.index("Per-Image TI: encoding latents (images 1-2 of 3)")
    assert all(at == 0 for _, _, at in sent[: first + 1])  # before any step was reported
    err = capsys.readouterr()
    assert "[dpagg] Per-Image TI: preparing the model" in err.out
    assert "dpagg Per-Image TI" in err.err and "4/4" in err.err  # the tqdm line, 2 chunks x 2
    # issue 20 item 7: the ETA is on the node too (it was only in the log's tqdm line)
    etas = [t for t in texts if " elapsed" in t]
    assert etas and "step 4 of 4, " in etas[-1] and "about 0:00 left" in etas[-1]
    assert all(t.startswith("Per-Image TI: ") and "training" in t for t in etas)


def test_eta_text_reads_as_time_left(pack):
    eta = pack["common"].eta_text
    assert eta(0, 8, 3.2) == "step 0 of 8, 0:03 elapsed"
    assert eta(2, 8, 10.0) == "step 2 of 8, 0:10 elapsed, about 0:30 left"
    assert eta(1, 3, 4000.0) == "step 1 of 3, 1:06:40 elapsed, about 2:13:20 left"


def _graph(pack, model="M", clip="C", vae="V", imgs=None, **aggregate_kw):
    """Per-Image TI -> (Privacy Accountant, DP Aggregate), as ComfyUI runs the template after a
    cache drop: every node executes afresh. Returns (job, DP Aggregate's output)."""
    imgs = comfy_images(3) if imgs is None else imgs
    with torch.inference_mode():
        job = (
            pack["per_image_ti"]
            .PerImageTI.execute(model=[model], clip=[clip], vae=[vae], images=[imgs], **TI_WIDGETS)
            .args[0]
        )
        plan = (
            pack["privacy_accountant"]
            .PrivacyAccountant.execute(**acc_kwargs(n=999), embedding_set=job)
            .args[0]
        )
        assert plan.n == 3 and job.trained_here == 0  # the accountant trains nothing
        out = aggregate(pack, job, plan, **({"budget_epsilon": 10.0} | aggregate_kw))
    return job, out


def test_identical_request_is_answered_from_the_ledger_without_training(
    pack, comfy_base, tiny_backend, counted_training
):
    """DP Aggregate asks the ledger before running Per-Image TI's deferred training: a re-run of
    the identical request (new job, as after ComfyUI dropped its caches or restarted) returns
    the recorded release, spends nothing and never calls the trainer, although training is not
    bit-reproducible here. Changing only DP Aggregate's name on a kept job releases again
    without training again."""
    ledger = Ledger(comfy_base / "user" / "dpagg" / "ledger.sqlite")
    job, first = _graph(pack)
    ui = first.ui["dpagg"][0]
    assert counted_training == [1] and job.trained_here == 1
    assert ui["reused"] is False and ui["trained"] is True and first.args[0] == "embedding:mystyle"
    spent = ledger.status(job.dataset_id)["spent"]["epsilon"]
    assert spent > 0 and len(ledger.list_releases()) == 1
    written = read_released(comfy_base / "models" / "embeddings" / "mystyle.safetensors")[0]

    job2, again = _graph(pack)  # the same request, a fresh job: nothing trains
    ui2 = again.ui["dpagg"][0]
    assert counted_training == [1] and job2.trained_here == 0, "the re-run trained"
    assert ui2["reused"] is True and ui2["trained"] is False
    assert any("nothing trained, nothing spent" in line for line in ui2["lines"])
    assert again.args[0] == "embedding:mystyle"
    assert ledger.status(job.dataset_id)["spent"]["epsilon"] == pytest.approx(spent)
    assert len(ledger.list_releases()) == 1
    (comfy_base / "models" / "embeddings" / "mystyle.safetensors").unlink()  # file deleted
    job3, third = _graph(pack)
    assert counted_training == [1] and third.ui["dpagg"][0]["reused"] is True
    rewritten = read_released(comfy_base / "models" / "embeddings" / "mystyle.safetensors")[0]
    assert torch.equal(rewritten["emb_params"], written["emb_params"])  # the recorded release

    # a new seed is a new request: trained and spent
    with torch.inference_mode():
        seeded = (
            pack["per_image_ti"]
            .PerImageTI.execute(
                model=["M"],
                clip=["C"],
                vae=["V"],
                images=[comfy_images(3)],
                **(TI_WIDGETS | {"training_seed": [1]}),
            )
            .args[0]
        )
        plan = calibration.calibrate(2.0, 1e-5, 3, "full")
        new = aggregate(pack, seeded, plan, budget_epsilon=10.0)
        assert counted_training == [1, 1] and new.ui["dpagg"][0]["reused"] is False
        # the kept (trained) job under another name: a new release, no second training
        other = aggregate(pack, seeded, plan, budget_epsilon=10.0, name="other")
    assert counted_training == [1, 1] and other.ui["dpagg"][0]["reused"] is False
    assert len(ledger.list_releases()) == 3


def test_over_budget_job_is_refused_before_training(
    pack, comfy_base, tiny_backend, counted_training
):
    with pytest.raises(BudgetExceeded):
        _graph(pack, budget_epsilon=0.5)  # plan epsilon 2 > budget 0.5
    assert counted_training == []


class _Patcher:
    """Just what ``comfy_model_key.model_key`` reads of a ComfyUI ModelPatcher."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.model = module
        self.patches: dict = {}
        self.object_patches: dict = {}
        self.weight_wrapper_patches: dict = {}

    def get_key_patches(self, filter_prefix=None):
        return {
            k: [(w, None)] + self.patches.get(k, [])
            for k, w in self.model.state_dict().items()
            if filter_prefix is None or k.startswith(filter_prefix)
        }

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):  # as ComfyUI's
        for k, v in patches.items():
            self.patches.setdefault(k, []).append((strength_patch, v, strength_model, None, None))


def _models(seed=0):
    torch.manual_seed(seed)
    unet, text, vae = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4), torch.nn.Linear(4, 4)
    return (
        _Patcher(unet),
        SimpleNamespace(patcher=_Patcher(text), layer_idx=None),
        SimpleNamespace(patcher=_Patcher(vae)),
    )


def _lora(seed: int, rank: int = 2):
    g = torch.Generator().manual_seed(seed)
    up, down = torch.randn((8, rank), generator=g), torch.randn((rank, 8), generator=g)
    return {"weight": ("lora", (up, down, 1.0, None, None, None))}


def test_a_lora_like_patch_is_a_new_request(
    pack, comfy_base, tiny_backend, counted_training, monkeypatch
):
    """The request key's model part is the models AS PATCHED (``comfy_model_key.model_key``): a
    LoRA-like weight patch on the MODEL, another strength, or CLIP Set Last Layer each make a new
    request (trained and spent); equal weights and patches give the same key, whatever object
    holds them."""
    from nodes import comfy_model_key

    key = comfy_model_key.model_key
    base = key(*_models())
    assert key(*_models()) == base  # the same weights, new objects: the same key
    assert key(*_models(seed=1)) != base  # other weights
    patched = _models()
    patched[0].add_patches(_lora(5), strength_patch=1.0)
    assert key(*patched) != base
    same = _models()
    same[0].add_patches(_lora(5), strength_patch=1.0)
    assert key(*same) == key(*patched)
    weaker = _models()
    weaker[0].add_patches(_lora(5), strength_patch=0.5)
    other_lora = _models()
    other_lora[0].add_patches(_lora(6), strength_patch=1.0)
    clip_skip = _models()
    clip_skip[1].layer_idx = -2
    on_clip = _models()
    on_clip[1].patcher.add_patches(_lora(5))
    keys = {key(*m) for m in (weaker, other_lora, clip_skip, on_clip)}
    assert len(keys | {base, key(*patched)}) == 6

    monkeypatch.setattr(pack["per_image_ti"], "_model_key", key)
    ledger = Ledger(comfy_base / "user" / "dpagg" / "ledger.sqlite")
    _graph(pack, *_models())
    _, again = _graph(pack, *_models())
    assert counted_training == [1] and again.ui["dpagg"][0]["reused"] is True
    _, lora = _graph(pack, *patched)  # the LoRA-patched model: a new request
    assert counted_training == [1, 1] and lora.ui["dpagg"][0]["reused"] is False
    assert lora.args[0] == "embedding:mystyle-2" and len(ledger.list_releases()) == 2
