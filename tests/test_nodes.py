"""The ComfyUI node pack with ComfyUI absent (CI).

``tests/comfy_stub`` stands in for the few ComfyUI names the nodes import (API shapes only). Every
privacy property checked here — ledger, budget, noise, files, per-image independence — runs the
real ``dpagg_core`` code. The real ComfyUI is covered by ``test_comfyui_integration.py``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from image_kinds import write_mixed_sizes
from PIL import Image

from dpagg_core.errors import BudgetExceeded, DpaggError
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.io.images import LoadedImages, load_image_folder
from dpagg_core.io.released_file import read_released
from dpagg_core.privacy import accountant, calibration
from dpagg_core.privacy.ledger import Ledger

REPO = Path(__file__).resolve().parent.parent
STUB = Path(__file__).resolve().parent / "comfy_stub"
STUB_MODULES = ("comfy_api", "comfy", "comfy_execution", "folder_paths", "nodes")


def _drop_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in STUB_MODULES:
            del sys.modules[name]


@pytest.fixture(scope="module")
def pack():
    """The pack's ``nodes`` package imported against the stub; removed again afterwards so no
    other test module sees a fake ``comfy_api``."""
    _drop_modules()
    sys.path[:0] = [str(STUB), str(REPO)]
    try:
        nodes = importlib.import_module("nodes")
        yield {
            "nodes": nodes,
            "common": importlib.import_module("nodes.common"),
            "load_private_images": importlib.import_module("nodes.load_private_images"),
            "per_image_ti": importlib.import_module("nodes.per_image_ti"),
            "clip_embeddings": importlib.import_module("nodes.clip_embeddings"),
            "privacy_accountant": importlib.import_module("nodes.privacy_accountant"),
            "public_basis": importlib.import_module("nodes.public_basis"),
            "dp_aggregate": importlib.import_module("nodes.dp_aggregate"),
            "folder_paths": importlib.import_module("folder_paths"),
            "io": importlib.import_module("comfy_api.latest").io,
            "utils": importlib.import_module("comfy.utils"),
            "mm": importlib.import_module("comfy.model_management"),
            "ExecutionBlocker": importlib.import_module(
                "comfy_execution.graph_utils"
            ).ExecutionBlocker,
        }
    finally:
        for p in (str(STUB), str(REPO)):
            sys.path.remove(p)
        _drop_modules()


@pytest.fixture
def comfy_base(pack, tmp_path, monkeypatch):
    """A ComfyUI-like folder (models/embeddings, user, output); the ledger goes to user/ as in
    ComfyUI (DPAGG_LEDGER unset)."""
    monkeypatch.setattr(pack["folder_paths"], "base_path", str(tmp_path))
    monkeypatch.delenv("DPAGG_LEDGER", raising=False)
    monkeypatch.setattr(pack["mm"], "interrupt_processing", False)
    pack["utils"].UPDATES.clear()
    return tmp_path


def ti_set(n=6, v=1, dim=16, seed=0, dataset_id="ds-test0000000000000000000000000000"):
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn((v, dim), generator=g)
    vecs = centre + 0.1 * torch.randn((n, v, dim), generator=g)
    return EmbeddingSet(
        vectors={"emb_params": vecs},
        kind="textual_inversion",
        model_family="sd1",
        base_model_id="test-model",
        centre={"emb_params": centre},
        initializer="painting",
        dataset_id=dataset_id,
    )


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


def aggregate(pack, eset, plan, **kw):
    args = {
        "clip_norm": 1.0,
        "centre": "initializer",
        "name": "mystyle",
        "mode": "clip",
        "budget_epsilon": 0.0,
        "budget_delta": 0.0,
    } | kw
    return pack["dp_aggregate"].DPAggregate.execute(embedding_set=eset, plan=plan, **args)


def widget_ids(node_cls, io) -> list[str]:
    widgets = (io.Int, io.Float, io.String, io.Boolean, io.Combo)
    return [
        i.id
        for i in node_cls.define_schema().inputs
        if any(isinstance(i, w.Input) for w in widgets)
    ]


# ------------------------------------------------------------------------------- loading


def test_root_init_imports_without_comfyui():
    """The pack's root __init__ registers nothing without ComfyUI; dpagg_core stays usable."""
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('comfy_api') is None\n"
        "spec = importlib.util.spec_from_file_location('dpagg_pack', "
        f"{str(REPO / '__init__.py')!r}, submodule_search_locations=[{str(REPO)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['dpagg_pack'] = m\n"
        "spec.loader.exec_module(m)\n"
        "assert m.WEB_DIRECTORY == './js' and not hasattr(m, 'comfy_entrypoint'), dir(m)\n"
        "assert 'dpagg_pack.nodes' not in sys.modules\n"
        "import dpagg_core.aggregate.release\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_entrypoint_lists_the_nodes_with_types(pack):
    import asyncio

    ext = asyncio.run(pack["nodes"].comfy_entrypoint())
    nodes = asyncio.run(ext.get_node_list())
    schemas = {n.define_schema().node_id: n.define_schema() for n in nodes}
    assert set(schemas) == {
        "DpaggLoadPrivateImages",
        "DpaggPerImageTI",
        "DpaggClipEmbeddings",
        "DpaggPrivacyAccountant",
        "DpaggPublicBasis",
        "DpaggAggregate",
        "DpaggPrivacyLedger",
    }
    assert {s.category for s in schemas.values()} == {"dpagg/privacy"}

    def types(items):
        return [i.get_io_type() for i in items]

    loader = schemas["DpaggLoadPrivateImages"]
    assert [i.id for i in loader.inputs] == ["folder", "resolution"]
    assert types(loader.outputs) == ["PRIVATE_IMAGES"]
    ti_s = schemas["DpaggPerImageTI"]
    images = "IMAGE,PRIVATE_IMAGES"  # Load Private Images, or any IMAGE batch / list
    assert types(ti_s.inputs[:4]) == ["MODEL", "CLIP", "VAE", images]
    assert types(ti_s.outputs) == ["EMBEDDING_SET"]
    assert ti_s.is_input_list  # accepts lists from ComfyUI's dataset loaders
    assert types(schemas["DpaggClipEmbeddings"].inputs[:2]) == ["CLIP_VISION", images]
    for node_id in ("DpaggPerImageTI", "DpaggClipEmbeddings"):  # to see the upstream loader
        assert {"PROMPT", "UNIQUE_ID"} <= set(schemas[node_id].hidden)
    assert types(schemas["DpaggPrivacyAccountant"].outputs) == ["DP_PLAN", "STRING"]
    agg = schemas["DpaggAggregate"]
    assert types(agg.inputs[:2]) == ["EMBEDDING_SET", "DP_PLAN"]
    optional = {i.id: i.get_io_type() for i in agg.inputs if i.optional}
    assert optional == {
        "basis": "PUBLIC_BASIS",
        "postprocess": "COMBO",
        "public_embeddings_file": "STRING",
    }
    (centre,) = [i for i in agg.inputs if i.id == "centre"]
    assert centre.options == ["initializer", "origin", "public_mean"]
    assert types(schemas["DpaggPublicBasis"].outputs) == ["PUBLIC_BASIS"]
    assert types(agg.outputs) == ["STRING", "CLIP_VISION_OUTPUT"]
    # The TI seed must not be randomised after each queue (a re-run would spend budget again).
    # (not named "seed": ComfyUI's frontend adds a randomize control to inputs named so)
    seed = next(i for i in ti_s.inputs if i.id == "training_seed")
    assert seed.control_after_generate is False
    assert not [i for i in ti_s.inputs if i.id in ("seed", "noise_seed")]


# ------------------------------------------------------------------------------- accountant


def acc_kwargs(**kw):
    base = {
        "mode": "target epsilon -> noise",
        "epsilon": 2.0,
        "noise_multiplier": 1.0,
        "delta": 1e-5,
        "n": 10,
        "sampling": "full",
        "m": 4,
        "q": 0.5,
        "releases": 1,
    }
    return base | kw


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"delta": 0.2}, "delta"),  # >= 1/n
        ({"delta": 0.0}, "delta"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"mode": "noise multiplier -> epsilon", "noise_multiplier": 0.0}, "noise_multiplier"),
        ({"sampling": "wor", "m": 11}, "m=11"),
        ({"sampling": "poisson", "q": 1.5}, "q="),
        ({"releases": 0}, "releases"),
        ({"n": 1}, "n=1"),
        ({"sampling": "bogus"}, "sampling"),
    ],
)
def test_accountant_validate_inputs_rejects_bad_parameters(pack, change, needle):
    msg = pack["privacy_accountant"].PrivacyAccountant.validate_inputs(**acc_kwargs(**change))
    assert isinstance(msg, str) and needle in msg


def test_accountant_validate_skips_n_checks_when_set_is_linked(pack):
    acc = pack["privacy_accountant"].PrivacyAccountant
    assert acc.validate_inputs(**acc_kwargs()) is True
    # n=1 widget is ignored when an EMBEDDING_SET is linked (ComfyUI passes None for links)
    assert acc.validate_inputs(**acc_kwargs(n=1, delta=0.01), embedding_set=None) is True


def test_accountant_reads_n_from_the_set_and_both_modes_agree(pack, comfy_base):
    acc = pack["privacy_accountant"].PrivacyAccountant
    eset = ti_set(n=6)
    out = acc.execute(**acc_kwargs(n=999), embedding_set=eset)
    plan, summary = out.args
    assert plan.n == 6 and plan.epsilon <= 2.0
    assert plan == calibration.calibrate(2.0, 1e-5, 6, "full")
    assert summary == accountant.plan_summary(plan)
    # reverse mode: the plan's noise multiplier gives back its epsilon
    back = acc.execute(
        **acc_kwargs(mode="noise multiplier -> epsilon", noise_multiplier=plan.noise_multiplier),
        embedding_set=eset,
    ).args[0]
    assert back.epsilon == pytest.approx(plan.epsilon, rel=1e-6)
    payload = out.ui["dpagg"][0]
    assert payload["plan"] == plan.to_dict()
    assert any("not set yet" in line for line in payload["lines"])  # no release yet
    json.dumps(out.ui)  # UI messages must be JSON


# ------------------------------------------------------------------------------- DP Aggregate


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
    text, _ = aggregate(pack, eset, plan, clip_norm=1.0).args
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
    text, vision = aggregate(pack, eset, plan, centre="origin", mode="normalize", name="cs").args
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


# ------------------------------------------------------------------------------- Per-Image TI


TI_WIDGETS = {
    "steps": [2],
    "learning_rate": [0.01],
    "vectors": [2],
    "initializer": ["painting"],
    "templates": ["style"],
    "resolution": [32],
    "batch_size": [2],
    "training_seed": [0],
}


@pytest.fixture
def tiny_backend(pack, monkeypatch):
    from tiny_models import tiny_pipeline

    from dpagg_core.training.diffusers_backend import DiffusersBackend

    backend = DiffusersBackend.from_pipeline(tiny_pipeline(), base_model_id="tiny-test")
    calls = []

    def factory(model, clip, vae):
        calls.append((model, clip, vae))
        return contextlib.nullcontext(backend)

    monkeypatch.setattr(pack["per_image_ti"], "_make_backend", factory)
    # the request key's model part: stub objects are no ModelPatchers (the real one is tested
    # on patcher-like objects in test_a_lora_like_patch_is_a_new_request)
    monkeypatch.setattr(pack["per_image_ti"], "_model_key", lambda m, c, v: f"stub:{m}:{c}:{v}")
    return calls


def comfy_images(n, size=32, seed=0):
    return torch.rand((n, size, size, 3), generator=torch.Generator().manual_seed(seed))


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


# ------------------------------------------------------------------------------- Clip Embeddings


class FakeClipVision:
    """Encodes an image as a fixed linear map of its pixels (stands in for CLIP vision)."""

    def __init__(self, dim=8):
        self.calls = []
        self.w = torch.randn((3, dim), generator=torch.Generator().manual_seed(5))
        self.model = torch.nn.Linear(3, dim)

    def encode_image(self, image, crop=True):
        self.calls.append((tuple(image.shape), crop))
        return {"image_embeds": image.mean(dim=(1, 2)) @ self.w}


def test_clip_embeddings_encode_each_image_alone(pack, comfy_base):
    cv = FakeClipVision()
    imgs = comfy_images(3, 24)
    eset = (
        pack["clip_embeddings"]
        .ClipEmbeddings.execute(clip_vision=[cv], images=[imgs], crop=["center"])
        .args[0]
    )
    assert cv.calls == [((1, 24, 24, 3), True)] * 3
    assert eset.kind == "clip_image" and eset.n == 3
    want = torch.nn.functional.normalize(imgs.mean(dim=(1, 2)) @ cv.w, dim=-1)  # unit rows
    assert torch.allclose(eset.vectors["image_embeds"][:, 0], want)
    assert eset.dataset_id == pack["common"].images_dataset_id(list(imgs))[0]


class ComfyClipVision:
    """ComfyUI's ``ClipVisionModel.encode_image`` (comfy/clip_vision.py) around a transformers
    CLIP vision model: ``clip_preprocess`` (bicubic to the model's size, 8-bit rounding, OpenAI
    mean/std), then the projected embedding as it comes (not normalised)."""

    def __init__(self, model):
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        self.model, self.size = model, int(model.config.image_size)
        self.mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)

    def encode_image(self, image, crop=True):
        x = image.movedim(-1, 1)
        if tuple(x.shape[-2:]) != (self.size, self.size):  # square test images: no crop
            x = torch.nn.functional.interpolate(x, (self.size, self.size), mode="bicubic")
        x = torch.clip(255.0 * x, 0, 255).round() / 255.0
        with torch.no_grad():
            out = self.model(pixel_values=(x - self.mean) / self.std)
        return {"image_embeds": out.image_embeds}


def test_clip_embeddings_node_gives_the_cli_vectors(pack, comfy_base):
    """The same pictures through the Clip Embeddings node (plain IMAGE or Load Private Images)
    and through the CLI/library path (``load_image_folder`` + ``clip_image_embeddings``, what
    ``dpagg aggregate --kind clip`` runs): the same unit-norm rows, model id and dataset id."""
    from test_clip_image import tiny_vision

    from dpagg_core.training.clip_image import clip_image_embeddings

    folder = comfy_base / "input" / "clip"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(4):  # at the model's 32 px: no resampling on either path
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(folder / f"{i}.png")
    model = tiny_vision()
    cli = clip_image_embeddings(
        model, load_image_folder(folder, 32, ledger=pack["common"].ledger_path())
    )
    want = cli.vectors["image_embeds"]
    assert torch.allclose(want.norm(dim=-1), torch.ones(4, 1), atol=1e-6)
    private = (
        pack["load_private_images"].LoadPrivateImages.execute(folder="clip", resolution=32).args[0]
    )
    for images in (originals_as_comfy_images(folder), [private]):
        cv = ComfyClipVision(model)
        got = (
            pack["clip_embeddings"]
            .ClipEmbeddings.execute(clip_vision=[cv], images=images, crop=["center"])
            .args[0]
        )
        assert torch.allclose(got.vectors["image_embeds"], want, atol=1e-6)
        assert got.base_model_id == cli.base_model_id and got.dataset_id == cli.dataset_id


# ------------------------------------------------------------------------------- identity


@pytest.fixture
def private_folder(comfy_base):
    """ComfyUI/input/mine: three pictures of different sizes and aspect ratios."""
    folder = comfy_base / "input" / "mine"
    write_mixed_sizes(folder)
    return folder


def rename_all(folder: Path) -> None:
    """New names whose sorted order is the reverse of the old one (another first file)."""
    paths = sorted(folder.iterdir())
    for i, p in enumerate(paths):
        p.rename(folder / f"z{len(paths) - i:02d}{p.suffix}")


def originals_as_comfy_images(folder: Path) -> list[torch.Tensor]:
    """What ComfyUI's Load Image hands over for each file: full size, 8-bit values / 255."""
    return [
        torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), np.float32) / 255)[None]
        for p in sorted(folder.iterdir())
    ]


def test_load_private_images_ids_pictures_not_names_order_or_resolution(
    pack, comfy_base, private_folder
):
    """Mixed sizes, renamed so that another file lists first, loaded at another resolution:
    one id, the one the CLI computes for the same files with the same ledger."""
    loader = pack["load_private_images"].LoadPrivateImages
    folder_input = next(i for i in loader.define_schema().inputs if i.id == "folder")
    assert folder_input.options == ["mine"]  # ComfyUI/input's sub-folders
    assert loader.validate_inputs(folder="mine", resolution=16) is True
    out = loader.execute(folder="mine", resolution=16)
    loaded = out.args[0]
    assert isinstance(loaded, LoadedImages) and tuple(loaded.pixels.shape) == (3, 3, 16, 16)
    ledger = comfy_base / "user" / "dpagg" / "ledger.sqlite"
    cli = load_image_folder(private_folder, 16, ledger=ledger)  # what `dpagg run` loads
    assert loaded.dataset_id == cli.dataset_id
    assert torch.equal(loaded.pixels, cli.pixels)  # and the same training input
    ui = out.ui["dpagg"][0]
    assert ui["dataset"] == loaded.dataset_id and ui["n"] == 3
    text = json.dumps(out.ui)  # public values only: no digests, no pixels
    assert not any(d.hex()[:16] in text for d in loaded.digests)
    assert "tensor" not in repr(loaded)  # safe if a generic node (Preview Any) prints it

    before = loader.fingerprint_inputs(folder="mine", resolution=16)
    rename_all(private_folder)
    assert loader.fingerprint_inputs(folder="mine", resolution=16) != before  # ComfyUI re-runs
    renamed = loader.execute(folder="mine", resolution=24).args[0]
    assert renamed.dataset_id == loaded.dataset_id


@pytest.mark.parametrize("folder", ["..", "../user", "/etc", "", "missing", "mine/../.."])
def test_load_private_images_stays_inside_the_input_folder(pack, private_folder, folder):
    msg = pack["load_private_images"].LoadPrivateImages.validate_inputs(
        folder=folder, resolution=16
    )
    assert isinstance(msg, str) and "folder" in msg
    with pytest.raises(DpaggError, match="folder"):
        pack["load_private_images"].LoadPrivateImages.execute(folder=folder, resolution=16)


def test_renamed_files_are_charged_to_the_same_budget(pack, comfy_base, private_folder):
    """A release of the set, then the files renamed (another listing order) and released again:
    the second release is charged to the SAME dataset, so it is refused over the budget."""
    first = (
        pack["load_private_images"].LoadPrivateImages.execute(folder="mine", resolution=16).args[0]
    )
    plan = calibration.calibrate(2.0, 1e-5, 3, "full")
    aggregate(pack, ti_set(n=3, dataset_id=first.dataset_id), plan, budget_epsilon=2.4)
    rename_all(private_folder)
    out = pack["load_private_images"].LoadPrivateImages.execute(folder="mine", resolution=16)
    renamed = out.args[0]
    assert out.ui["dpagg"][0]["spent"]["epsilon"] == pytest.approx(plan.epsilon)
    ledger = Ledger(comfy_base / "user" / "dpagg" / "ledger.sqlite")
    before = ledger.status(renamed.dataset_id)
    with pytest.raises(BudgetExceeded):
        eset = ti_set(n=3, seed=1, dataset_id=renamed.dataset_id)
        aggregate(pack, eset, plan, budget_epsilon=2.4, name="again")
    assert ledger.status(renamed.dataset_id) == before


def test_per_image_ti_on_private_images_keeps_the_loaders_id(
    pack, comfy_base, private_folder, tiny_backend
):
    """PRIVATE_IMAGES into Per-Image TI (and Clip Embeddings): the id of the carried digests,
    equal to the id of the same pictures given as plain ComfyUI images in any order."""
    loaded = (
        pack["load_private_images"].LoadPrivateImages.execute(folder="mine", resolution=16).args[0]
    )
    with torch.inference_mode():
        out = pack["per_image_ti"].PerImageTI.execute(
            model=["M"], clip=["C"], vae=["V"], images=[loaded], **TI_WIDGETS
        )
    eset = out.args[0]
    assert eset.n == 3 and eset.dataset_id == loaded.dataset_id
    payload = out.ui["dpagg"][0]
    assert payload["dataset"] == loaded.dataset_id
    assert any("upscaled here to 32 px" in line for line in payload["lines"])  # 16 px loader
    plain = originals_as_comfy_images(private_folder)[::-1]  # Load Image path, another order
    with torch.inference_mode():
        out2 = pack["per_image_ti"].PerImageTI.execute(
            model=["M"], clip=["C"], vae=["V"], images=plain, **TI_WIDGETS
        )
    assert out2.args[0].dataset_id == loaded.dataset_id
    cv = FakeClipVision()
    clip_set_ = pack["clip_embeddings"].ClipEmbeddings.execute(
        clip_vision=[cv], images=[loaded], crop=["center"]
    )
    assert clip_set_.args[0].dataset_id == loaded.dataset_id
    assert cv.calls == [((1, 16, 16, 3), True)] * 3
    with pytest.raises(DpaggError, match="ONE Load Private Images"):
        pack["per_image_ti"].PerImageTI.execute(
            model=["M"], clip=["C"], vae=["V"], images=[loaded, plain[0]], **TI_WIDGETS
        )


@pytest.mark.parametrize("resolution", [16, 48])
def test_node_training_pixels_are_the_clis(pack, comfy_base, private_folder, resolution):
    """The pixels Per-Image TI trains on are the CLI's (``dpagg run``: ``load_image_folder``):
    exactly, from plain IMAGE input; and Load Private Images' pictures wanted at another
    resolution are fitted with the CLI's filter (Lanczos), as the CLI fits those pictures."""
    from dpagg_core.io.images import load_images

    cli = load_image_folder(private_folder, resolution, ledger=pack["common"].ledger_path())
    plain = originals_as_comfy_images(private_folder)
    x, dataset_id, _ = pack["per_image_ti"].training_images(None, plain, resolution)
    assert torch.equal(x, cli.pixels) and dataset_id == cli.dataset_id
    loaded = (
        pack["load_private_images"].LoadPrivateImages.execute(folder="mine", resolution=32).args[0]
    )
    x, dataset_id, _ = pack["per_image_ti"].training_images(None, [loaded], resolution)
    pictures = ((loaded.pixels + 1) / 2).clamp(0, 1)  # the 32 px pictures, as the CLI takes them
    assert torch.equal(x, load_images(pictures, resolution).pixels)
    assert dataset_id == cli.dataset_id
    assert torch.equal(pack["common"].to_model_images(plain, resolution), cli.pixels)


def test_core_folder_loaders_are_refused_before_anything_runs(
    pack, comfy_base, tiny_backend, monkeypatch
):
    """ComfyUI's dataset loaders resize every picture to the first file of an unsorted listing
    (renaming gave a new id, a fresh budget): a direct link from one is refused, naming the fix;
    Load Image upstream is fine."""
    for cls_name in sorted(pack["common"].UNSTABLE_LOADERS):
        prompt = {
            "2": {"class_type": cls_name, "inputs": {"folder": "mine", "resize_method": "None"}},
            "3": {"class_type": "DpaggPerImageTI", "inputs": {"images": ["2", 0]}},
        }
        hidden = SimpleNamespace(prompt=prompt, unique_id="3")
        monkeypatch.setattr(pack["per_image_ti"].PerImageTI, "hidden", hidden)
        monkeypatch.setattr(pack["clip_embeddings"].ClipEmbeddings, "hidden", hidden)
        with pytest.raises(DpaggError, match=f"{cls_name}.*Load Private Images"):
            pack["per_image_ti"].PerImageTI.execute(
                model=["M"], clip=["C"], vae=["V"], images=[comfy_images(2)], **TI_WIDGETS
            )
        cv = FakeClipVision()
        with pytest.raises(DpaggError, match="Nothing was trained or spent"):
            pack["clip_embeddings"].ClipEmbeddings.execute(
                clip_vision=[cv], images=[comfy_images(2)], crop=["center"]
            )
        assert tiny_backend == [] and cv.calls == []
    prompt["2"]["class_type"] = "LoadImage"
    with torch.inference_mode():
        pack["per_image_ti"].PerImageTI.execute(
            model=["M"], clip=["C"], vae=["V"], images=[comfy_images(2)], **TI_WIDGETS
        )
    assert len(tiny_backend) == 1


def test_paths_mean_the_same_file_in_nodes_cli_and_library(
    pack, comfy_base, tmp_path, monkeypatch, capsys
):
    """``~`` in DPAGG_LEDGER / DPAGG_DATA_DIR / any path argument: one file for the nodes, the CLI
    and the library (a literal ``~`` used to make one ledger per working directory)."""
    from dpagg_core import paths
    from dpagg_core.cli import build_parser

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("DPAGG_LEDGER", "~/dp/ledger.sqlite")
    monkeypatch.setenv("DPAGG_DATA_DIR", "~/dpdata")
    want = home / "dp" / "ledger.sqlite"
    assert pack["common"].ledger_path() == want == paths.default_ledger_path()
    assert paths.data_dir() == home / "dpdata"
    parser = build_parser()
    assert parser.parse_args(["ledger", "show", "--ledger", "~/dp/ledger.sqlite"]).ledger == want
    run = ["run", "--images", "~/imgs", "--model", "m.safetensors", "--epsilon", "1"]
    args = parser.parse_args(run + ["--name", "x", "--out-dir", "~/out"])
    assert (args.images, args.model, args.out_dir) == (
        home / "imgs",
        cwd / "m.safetensors",
        home / "out",
    )
    eset = ti_set(n=6)
    aggregate(pack, eset, calibration.calibrate(1.0, 1e-5, 6, "full"))  # the node's release
    assert want.is_file() and not (cwd / "~").exists()
    from dpagg_core.cli import main

    monkeypatch.delenv("DPAGG_LEDGER")
    assert main(["ledger", "show", "--json", "--ledger", "~/dp/ledger.sqlite"]) == 0
    shown = json.loads(capsys.readouterr().out)  # the CLI reads the file the node wrote
    assert shown["ledger"] == str(want) and len(shown["releases"]) == 1


# ------------------------------------------------------------------------------- workflows / js


@pytest.mark.parametrize("name", ["private_style_embedding", "private_clip_style"])
def test_example_workflows_are_consistent(pack, name):
    wf = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    for lid, src, src_slot, dst, dst_slot, typ in wf["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == typ
        assert lid in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == lid
        assert typ in nodes[dst]["inputs"][dst_slot]["type"].split(",")
    ours = {c.define_schema().node_id: c for c in pack["nodes"].NODES}
    used = [n for n in wf["nodes"] if n["type"] in ours]
    assert {n["type"] for n in used} >= {
        "DpaggLoadPrivateImages",
        "DpaggPrivacyAccountant",
        "DpaggAggregate",
    }
    # the images come from Load Private Images, never a loader whose id depends on file names
    assert not {n["type"] for n in wf["nodes"]} & pack["common"].UNSTABLE_LOADERS
    loader = next(n for n in used if n["type"] == "DpaggLoadPrivateImages")
    (link,) = loader["outputs"][0]["links"]
    dst = next(x for x in wf["links"] if x[0] == link)[3]
    assert nodes[dst]["type"] in ("DpaggPerImageTI", "DpaggClipEmbeddings")
    for n in used:  # widget values line up with the node's current schema
        assert len(n["widgets_values"]) == len(widget_ids(ours[n["type"]], pack["io"])), n["type"]
    text = json.dumps(wf)
    assert "embedding_set" in text and "DP_PLAN" in text


def test_frontend_extension_reads_the_ui_key(pack):
    js = (REPO / "js" / "dpagg.js").read_text()
    assert f"message?.{pack['common'].UI_KEY}?.[0]" in js
    for node_id in ("DpaggPrivacyAccountant", "DpaggAggregate"):
        assert f'"{node_id}"' in js


def test_frontend_extension_is_valid_javascript(pack):
    node = shutil.which("node")
    if node is None:
        pytest.skip("no Node.js `node` binary on PATH: the syntax check of js/dpagg.js needs it")
    mjs = Path(pack["common"].__file__).parent.parent / "js" / "dpagg.js"
    check = subprocess.run(
        [node, "--input-type=module", "--check"],
        input=mjs.read_text(),
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr


def test_ui_payload_numbers_are_public(pack, comfy_base):
    """The DP Aggregate message holds the plan, budget figures and names, nothing per image."""
    eset = ti_set(n=6)
    plan = calibration.calibrate(1.0, 1e-5, 6, "full")
    payload = aggregate(pack, eset, plan, budget_epsilon=2.0).ui["dpagg"][0]
    allowed = {
        "title",
        "lines",
        "warning",
        "name",
        "prompt",
        "reused",
        "plan",
        "budget",
        "spent",
        "remaining",
        "releases",
        "next_release_exceeds",
    }
    assert set(payload) == allowed
    flat = np.concatenate([eset.flat().ravel()])
    text = json.dumps(payload)
    assert not any(f"{v:.6f}" in text for v in flat[:50])


# ---------------------------------------------------------------------- default delta (1e-5)


def test_accountant_node_defaults_to_delta_1e5_and_warns_on_the_node(pack, comfy_base):
    acc = pack["privacy_accountant"].PrivacyAccountant
    (delta_input,) = [i for i in acc.define_schema().inputs if i.id == "delta"]
    assert delta_input.default == 1e-5 == accountant.DEFAULT_DELTA
    quiet = acc.execute(**acc_kwargs(n=10)).ui["dpagg"][0]
    assert not quiet["warning"] and quiet["delta_warning"] is None
    out = acc.execute(**acc_kwargs(n=10, delta=1e-3))
    payload = out.ui["dpagg"][0]
    assert payload["warning"]  # shown red on the node
    assert payload["lines"][0].startswith("WARNING: delta = 0.001 is above the default 1e-05")
    assert "1/(10 n) = 0.01" not in payload["lines"][0]  # 1e-3 < 1/(10 n) at n = 10
    assert "fails completely" in payload["delta_warning"]
    assert out.args[1].startswith("WARNING:")  # the summary output says it too
    json.dumps(out.ui)


# ----------------------------------------------------------------- public basis (issue 10)


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


@pytest.fixture
def fake_checkpoint(pack, monkeypatch):
    """The Public Basis node's token-table seam: a 49408-row table of width 16 named like the
    ComfyUI backend names checkpoints (``comfyui:<family>:<hash>``)."""
    table = torch.randn((49408, 16), generator=torch.Generator().manual_seed(0))
    calls = []

    def tables(model, clip):
        calls.append((model, clip))
        return "sd1", "comfyui:sd1:0123456789abcdef", {"emb_params": table}

    monkeypatch.setattr(pack["public_basis"], "_checkpoint_tables", tables)
    return calls


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
            aggregate(pack, eset, plan, basis=bad)
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


# ------------------------------------------------------------ public-mean centre (DP Aggregate)


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


# ------------------------------------------------------------------------------ Privacy Ledger


def test_refusal_names_the_comfyui_way_and_the_ledger_dialog_route_raises_only_when_confirmed(
    pack, comfy_base
):
    """ComfyUI's install puts no `dpagg` on PATH: the refusal names the Privacy Ledger node and
    the exact `python -m dpagg_core.cli` command; the node lists the sets and releases, and the
    "Raise budget..." dialog's route function raises a budget only for a JSON request with the
    typed confirmation (then the refused release goes through)."""
    ln = importlib.import_module("nodes.ledger_node")
    node = ln.PrivacyLedger
    schema = node.GET_SCHEMA()
    assert schema.node_id == "DpaggPrivacyLedger" and schema.is_output_node
    eset = ti_set(n=6)
    plan = calibration.calibrate(2.0, 1e-5, 6, "full")
    aggregate(pack, eset, plan, budget_epsilon=2.0)  # the budget is now used up
    with pytest.raises(BudgetExceeded) as err:
        aggregate(pack, eset, plan, name="another")
    msg = str(err.value)
    ds = eset.dataset_id
    assert "Privacy Ledger node" in msg and f"dataset {ds}" in msg
    assert f"{sys.executable} -m dpagg_core.cli ledger set-budget --ledger " in msg
    assert f"cd {REPO} && " in msg and "`dpagg ledger" not in msg
    assert "used up" in msg and "smaller epsilon" not in msg

    shown = node.execute(action="show", dataset="")
    assert ds in shown.args[0] and " mystyle eps 2 " in shown.args[0]
    table = shown.ui["dpagg"][0]["datasets"]
    assert [t["dataset"] for t in table] == [ds] and table[0]["budget"]["epsilon"] == 2.0
    path = comfy_base / "user" / "dpagg" / "ledger.sqlite"
    ledger = Ledger(path)

    def post(body, content_type="application/json"):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return ln.raise_budget(ln.comfy_ledger(), content_type, raw)

    good = {"dataset": ds, "epsilon": 5, "delta": 0, "confirm": f"raise {ds} to 5"}
    refused = [  # (request, content type, status)
        (good, "text/plain", 415),  # a cross-origin "simple" request cannot be JSON
        (good, "application/x-www-form-urlencoded", 415),
        (good, "", 415),
        (b"raise it", "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        ({**good, "confirm": ""}, "application/json", 400),
        ({**good, "confirm": "yes"}, "application/json", 400),
        ({**good, "confirm": f"raise {ds} to 4"}, "application/json", 400),
        ({**good, "confirm": "raise ds-other to 5"}, "application/json", 400),
        ({k: v for k, v in good.items() if k != "confirm"}, "application/json", 400),
        ({**good, "epsilon": "5"}, "application/json", 400),
        ({**good, "epsilon": True, "confirm": f"raise {ds} to 1"}, "application/json", 400),
        ({**good, "epsilon": -5, "confirm": f"raise {ds} to -5"}, "application/json", 400),
        ({**good, "dataset": ""}, "application/json", 400),
        (
            {**good, "dataset": "ds-unknown", "confirm": "raise ds-unknown to 5"},
            "application/json",
            404,
        ),
        ({**good, "epsilon": 1, "confirm": f"raise {ds} to 1"}, "application/json", 409),
    ]
    for body, ctype, status in refused:
        code, reply = post(body, ctype)
        assert (code, reply["ok"]) == (status, False), (body, ctype, reply)
        assert reply["error"].endswith("Nothing was changed."), reply
        assert ledger.status(ds)["budget"] == {"epsilon": 2.0, "delta": 1e-5}
    code, reply = post({**good, "confirm": f"raise {ds} to 4"})
    assert f"type exactly 'raise {ds} to 5'" in reply["error"]

    code, reply = post(good, "application/json; charset=utf-8")
    assert code == 200 and reply["ok"] is True, reply
    assert reply["lines"][0] == f"budget of {ds}: 2 -> 5 (delta 1e-05)"
    assert reply["datasets"][0]["budget"] == {"epsilon": 5.0, "delta": 1e-5}
    assert ledger.status(ds)["budget"] == {"epsilon": 5.0, "delta": 1e-5}
    assert aggregate(pack, eset, plan, name="another").args[0] == "embedding:another"
    # "5.0" is the same number; an explicit delta is used
    code, reply = post({**good, "epsilon": 6.5, "delta": 2e-5, "confirm": f"raise {ds} to 6.50"})
    assert code == 200 and ledger.status(ds)["budget"] == {"epsilon": 6.5, "delta": 2e-5}


def test_ledger_node_only_shows_and_refuses_an_old_raise_workflow(pack, comfy_base):
    """Raising is out of the graph: the node's only inputs are action (only 'show') and dataset,
    so no workflow can compute or carry a confirmation. A workflow saved before this change
    (action 'raise budget' and a matching confirmation) is refused before it runs (validate_inputs,
    replacing ComfyUI's list check for action) and again in execute, saying how to raise; the
    budget is unchanged."""
    ln = importlib.import_module("nodes.ledger_node")
    node = ln.PrivacyLedger
    assert widget_ids(node, pack["io"]) == ["action", "dataset"]
    action = node.GET_SCHEMA().inputs[0]
    assert action.options == ["show"]
    eset = ti_set(n=6)
    aggregate(pack, eset, calibration.calibrate(1.0, 1e-5, 6, "full"), budget_epsilon=1.0)
    ds = eset.dataset_id
    ledger = Ledger(comfy_base / "user" / "dpagg" / "ledger.sqlite")
    assert node.validate_inputs(action="show", dataset=ds) is True
    for value in ("raise budget", "set budget"):
        msg = node.validate_inputs(action=value, dataset=ds)
        assert isinstance(msg, str) and "Nothing was changed" in msg
        with pytest.raises(DpaggError) as err:
            node.execute(action=value, dataset=ds)
        assert str(err.value) == msg
    msg = node.validate_inputs(action="raise budget", dataset=ds)
    assert "action 'raise budget' is refused" in msg and "Set action to 'show'" in msg
    assert "'Raise budget...' on the Privacy Ledger node" in msg and f"raise {ds} to" in msg
    assert f"-m dpagg_core.cli ledger set-budget --ledger {ledger.path} --dataset {ds}" in msg
    # a linked dataset arrives as None at validation
    assert "--dataset DATASET" in node.validate_inputs(action="raise budget", dataset=None)
    assert ledger.status(ds)["budget"]["epsilon"] == 1.0


def test_raise_route_registers_only_on_a_comfyui_server(pack, monkeypatch):
    """No ComfyUI server (plain imports, these tests): nothing registered. With one: the route
    goes on PromptServer.instance.routes (ComfyUI's app and middleware serve it), once."""
    ln = importlib.import_module("nodes.ledger_node")
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert ln.register_routes() is False

    class Routes:
        def __init__(self):
            self.added = []

        def post(self, path):
            return lambda handler: self.added.append((path, handler)) or handler

    instance = SimpleNamespace(routes=Routes())
    monkeypatch.setitem(
        sys.modules, "server", SimpleNamespace(PromptServer=SimpleNamespace(instance=instance))
    )
    assert ln.register_routes() is True and ln.register_routes() is True
    assert instance.routes.added == [("/dpagg/ledger/budget", ln.raise_budget_route)]
    monkeypatch.setitem(
        sys.modules, "server", SimpleNamespace(PromptServer=SimpleNamespace(instance=None))
    )
    assert ln.register_routes() is False


def test_frontend_ledger_button_is_not_a_saved_widget(pack):
    """js/dpagg.js draws the Privacy Ledger's status and adds its "Raise budget..." button as a
    widget that is serialized neither in widgets_values nor in the prompt; the dialog POSTs JSON
    to the route."""
    js = (REPO / "js" / "dpagg.js").read_text()
    nodes_set = js[js.index("const DPAGG_NODES") : js.index("]);")]
    assert '"DpaggPrivacyLedger"' in nodes_set
    assert 'RAISE_BUTTON = "Raise budget..."' in js
    assert "button.serialize = false" in js and "serialize: false" in js
    assert 'RAISE_ROUTE = "/dpagg/ledger/budget"' in js
    assert '"Content-Type": "application/json"' in js


def test_accountant_shows_the_verdict_dp_aggregate_will_give(pack, comfy_base, monkeypatch):
    """The Privacy Accountant reads the budget_epsilon/budget_delta of the DP Aggregate it feeds
    (from the queued prompt) and runs the same ledger check: a plan DP Aggregate refuses is
    flagged on the accountant, and one it accepts is not."""
    eset = ti_set(n=6)
    acc = pack["privacy_accountant"].PrivacyAccountant
    assert {"PROMPT", "UNIQUE_ID"} <= set(acc.GET_SCHEMA().hidden)

    def queued(budget_epsilon):
        prompt = {
            "7": {"class_type": "DpaggPrivacyAccountant", "inputs": {}},
            "9": {
                "class_type": "DpaggAggregate",
                "inputs": {"plan": ["7", 0], "budget_epsilon": budget_epsilon, "budget_delta": 0},
            },
        }
        monkeypatch.setattr(acc, "hidden", SimpleNamespace(prompt=prompt, unique_id="7"))
        return acc.execute(**acc_kwargs(n=6, epsilon=2.0), embedding_set=eset)

    out = queued(1.5)  # DP Aggregate's budget 1.5 < the plan's epsilon 2
    ui = out.ui["dpagg"][0]
    assert ui["warning"] is True and ui["will_be_refused"] is True
    assert any(
        line.startswith("WARNING: DP Aggregate (node 9) will refuse") for line in ui["lines"]
    )
    with pytest.raises(BudgetExceeded):
        aggregate(pack, eset, out.args[0], budget_epsilon=1.5)
    ok = queued(3.0).ui["dpagg"][0]
    assert ok["will_be_refused"] is False and not any("refuse" in x for x in ok["lines"])
    aggregate(pack, eset, out.args[0], budget_epsilon=3.0)


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


def test_ledger_shows_the_file_name_actually_written(pack, comfy_base, capsys):
    """A second release requested as "mystyle" is written as mystyle-2: `dpagg ledger show` and
    the Privacy Ledger node show mystyle-2 (the requested name stays in the request key)."""
    from dpagg_core.cli import main

    eset = ti_set(n=6)
    plan = calibration.calibrate(1.0, 1e-5, 6, "full")
    aggregate(pack, eset, plan, budget_epsilon=3.0)
    assert aggregate(pack, eset, plan, clip_norm=0.5).args[0] == "embedding:mystyle-2"
    aggregate(pack, eset, plan, clip_norm=0.5)  # re-used: no second file, no second note
    path = comfy_base / "user" / "dpagg" / "ledger.sqlite"
    rows = Ledger(path).list_releases()
    assert [(r["name"], r["files"]) for r in rows] == [
        ("mystyle", ["mystyle"]),
        ("mystyle", ["mystyle-2"]),
    ]
    assert main(["ledger", "show", "--ledger", str(path)]) == 0
    out = capsys.readouterr().out
    assert "file=mystyle-2 (requested name=mystyle)" in out
    node = importlib.import_module("nodes.ledger_node").PrivacyLedger
    shown = node.execute(action="show", dataset="").args[0]
    assert " mystyle-2 eps " in shown


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


# ------------------------------------------------------- deferred training (issue 19 item 2)


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


@pytest.fixture
def counted_training(pack, monkeypatch):
    """``ti.train_embeddings`` made NON-deterministic on purpose (as on a GPU), counting calls."""
    real, calls = pack["per_image_ti"].ti.train_embeddings, []

    def noisy(*args, **kwargs):
        calls.append(1)
        eset = real(*args, **kwargs)
        for key, t in eset.vectors.items():
            eset.vectors[key] = t + 1e-3 * torch.randn_like(t)
        return eset

    monkeypatch.setattr(pack["per_image_ti"].ti, "train_embeddings", noisy)
    return calls


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
    """Just what ``comfy_backend.model_key`` reads of a ComfyUI ModelPatcher."""

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
    """The request key's model part is the models AS PATCHED (``comfy_backend.model_key``): a
    LoRA-like weight patch on the MODEL, another strength, or CLIP Set Last Layer each make a new
    request (trained and spent); equal weights and patches give the same key, whatever object
    holds them."""
    from nodes import comfy_backend

    key = comfy_backend.model_key
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
