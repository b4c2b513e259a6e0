"""The **Load Private Images** node: a folder of ComfyUI/input decoded like Load Image and
identified like the CLI (``dpagg_core.io.images.load_image_folder``); see ``nodes/common.py``
for the identity of an image set."""

from __future__ import annotations

import hashlib
from typing import Any

from comfy_api.latest import io

from dpagg_core.errors import DpaggError
from dpagg_core.io.files import folder_fingerprint
from dpagg_core.io.images import (
    load_image_folder,
)

from .budget_status import budget_block, budget_query
from .common import (
    CATEGORY,
    PrivateImagesIO,
    _ui,
    check_folder_inputs,
    comfy_ledger,
    input_folder,
    input_subfolders,
    ledger_path,
)


def _folder_fingerprint(folder: str, resolution: Any) -> str:
    """Changes when a file of the folder is added, removed, renamed or rewritten (ComfyUI then
    re-runs the loader; renaming re-runs it but keeps the dataset id)."""
    key = f"{folder}\0{resolution}"
    try:
        return folder_fingerprint(input_folder(folder), key)
    except (DpaggError, OSError) as exc:
        return hashlib.sha256(f"{key}\0{exc!r}".encode()).hexdigest()


class LoadPrivateImages(io.ComfyNode):
    """A folder of private images, decoded like ComfyUI's Load Image, identified like the CLI."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DpaggLoadPrivateImages",
            display_name="Load Private Images (dpagg)",
            category=CATEGORY,
            description=(
                "Loads every image of a folder in ComfyUI/input (sorted by name, EXIF orientation "
                "applied, decoded like Load Image) and fits each to resolution x resolution. The "
                "image set's dataset id - its privacy budget - comes from the original pictures: "
                "renaming, re-ordering or another resolution keeps it, and `dpagg run` on the same "
                "files gets the same id. PRIVATE: only dpagg nodes accept the output."
            ),
            inputs=[
                io.Combo.Input(
                    "folder",
                    options=input_subfolders(),
                    tooltip="a sub-folder of ComfyUI/input holding the private images",
                ),
                io.Int.Input(
                    "resolution",
                    default=512,
                    min=8,
                    max=4096,
                    step=8,
                    tooltip="each image's centred square is resized to this (512 for SD1.x, 768 "
                    "SD2.x, 1024 SDXL); it does not change the dataset id",
                ),
            ],
            outputs=[PrivateImagesIO.Output(display_name="PRIVATE_IMAGES")],
        )

    @classmethod
    def validate_inputs(cls, folder: Any = None, resolution: Any = 512) -> bool | str:
        return check_folder_inputs(folder, resolution)

    @classmethod
    def fingerprint_inputs(cls, folder: Any = None, resolution: Any = 512) -> str:
        return _folder_fingerprint(str(folder), resolution)

    @classmethod
    def execute(cls, folder, resolution) -> io.NodeOutput:
        ledger = ledger_path()
        loaded = load_image_folder(input_folder(str(folder)), int(resolution), ledger=ledger)
        lines = [
            f"{loaded.count} private images at {loaded.resolution} px (private: in memory only)",
            f"image set {loaded.dataset_id} (from the original pictures; names, order and "
            "resolution do not change it)",
        ]
        query = budget_query(loaded.dataset_id)
        more, _, figures = budget_block(comfy_ledger(ledger), query)
        lines += [f"warning: {w}" for w in loaded.warnings]
        if loaded.notes:
            lines.append(f"{len(loaded.notes)} non-image entries skipped")
        lines += more  # last: js/dpagg.js replaces them with fresh ones after any release
        duplicates = any(w.startswith("duplicate") for w in loaded.warnings)  # privacy: red
        ui = _ui(
            "Load Private Images",
            lines,
            duplicates,
            n=loaded.count,
            dataset=loaded.dataset_id,
            budget_lines=more,
            budget_query=query,
            own_warning=duplicates,
            **figures,
        )
        return io.NodeOutput(loaded, ui=ui)
