"""The Load Private Images node (``nodes/load_private_images.py``) and the image-set identity of
the nodes' image inputs, ComfyUI absent.
Shared helpers: ``tests/nodes_fixtures.py``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from nodes_fixtures import (
    TI_WIDGETS,
    FakeClipVision,
    aggregate,
    comfy_images,
    originals_as_comfy_images,
    ti_set,
)

from dpagg_core.errors import BudgetExceeded, DpaggError
from dpagg_core.io.images import LoadedImages, load_image_folder
from dpagg_core.privacy import calibration
from dpagg_core.privacy.ledger import Ledger


def rename_all(folder: Path) -> None:
    """New names whose sorted order is the reverse of the old one (another first file)."""
    paths = sorted(folder.iterdir())
    for i, p in enumerate(paths):
        p.rename(folder / f"z{len(paths) - i:02d}{p.suffix}")


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
