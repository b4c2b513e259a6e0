"""The **Load Public Images** node: a folder of ComfyUI/input holding PUBLIC pictures (a style like
the private one, from which the public basis, the public-mean centre and C are built in the
graph, or a rehearsal is run; issue 21 items 1 and 3).

Privacy (docs/privacy.md invariant 8): the pictures are loaded with ``public=True``
(``dpagg_core.io.images.load_image_folder``): any picture the pack's ledger knows as private is
refused by name, and none is registered. ``PUBLIC_IMAGES`` is its own type, so a public folder
can never be linked where a private set is expected (Per-Image TI marks its job public and DP
Aggregate and the Privacy Accountant refuse that job)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from comfy_api.latest import io

from dpagg_core.errors import DpaggError
from dpagg_core.io.files import folder_fingerprint
from dpagg_core.io.images import IMAGE_EXTENSIONS, load_image_folder
from dpagg_core.training.public import public_style_folders

from .common import (
    CATEGORY,
    PublicImagesIO,
    _ui,
    check_folder_inputs,
    input_folder,
    input_subfolders,
    ledger_path,
)


def _public_fingerprint(folder: str, resolution: Any) -> str:
    """Changes when a file of the folder or of one of its style subfolders changes."""
    key = f"public\0{folder}\0{resolution}"
    try:
        root = input_folder(folder)
        subs = sorted(p for p in root.iterdir() if p.is_dir())
        parts = [folder_fingerprint(p, key) for p in [root, *subs]]
    except (DpaggError, OSError) as exc:
        parts = [key, repr(exc)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


@dataclass(eq=False)
class PublicImages:
    """``PUBLIC_IMAGES``: public pictures fitted to one resolution, with their style (``groups[i]``
    indexes ``styles``; one folder = one style) and their full-size digests (for the keyed ids
    a public embeddings file carries and the cache key). Not private, but kept out of UI
    messages all the same (they are pictures, not figures)."""

    pixels: torch.Tensor = field(repr=False)  # float32 [N, 3, R, R] in [-1, 1]
    digests: list[bytes] = field(repr=False)
    groups: tuple[int, ...]
    styles: tuple[str, ...]
    folder: str
    warnings: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def resolution(self) -> int:
        return int(self.pixels.shape[-1])


def _style_folders(folder: Path) -> list[Path] | None:
    """The style subfolders of ``folder`` when it holds no loose images (>= 3, one per style:
    ``training.public.public_style_folders``), else None (the folder is one style)."""
    loose = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    return None if loose else public_style_folders(folder)


def load_public_images(folder: str, resolution: int) -> PublicImages:
    """The PUBLIC pictures of ``folder`` (a sub-folder of ComfyUI/input): its images, or one
    subfolder per style when it holds only subfolders. Private pictures are refused."""
    root = input_folder(folder)
    styles = _style_folders(root)
    parts = [
        load_image_folder(p, resolution, ledger=ledger_path(), public=True)
        for p in (styles or [root])
    ]
    return PublicImages(
        pixels=torch.cat([p.pixels for p in parts]),
        digests=[d for p in parts for d in p.digests],
        groups=tuple(i for i, p in enumerate(parts) for _ in range(p.count)),
        styles=tuple(p.name for p in styles) if styles else (root.name,),
        folder=str(folder),
        warnings=[w for p in parts for w in p.warnings],
    )


class LoadPublicImages(io.ComfyNode):
    """A folder of PUBLIC images (one style, or one subfolder per style)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DpaggLoadPublicImages",
            display_name="Load Public Images (dpagg)",
            category=CATEGORY,
            description=(
                "Loads PUBLIC images (pictures you may publish, of a style like yours) from a "
                "folder in ComfyUI/input: its images, or one subfolder per style (>= 3) to let "
                "Public Style choose k. Through Per-Image TI they give Public Style (the basis, "
                "the public-mean centre and C for DP Aggregate) or a rehearsal. A picture the "
                "privacy ledger knows as private is refused; nothing is recorded or spent."
            ),
            inputs=[
                io.Combo.Input(
                    "folder",
                    options=input_subfolders(),
                    tooltip="a sub-folder of ComfyUI/input holding PUBLIC images (never the "
                    "private ones)",
                ),
                io.Int.Input(
                    "resolution",
                    default=512,
                    min=8,
                    max=4096,
                    step=8,
                    tooltip="the same resolution as Load Private Images",
                ),
            ],
            outputs=[PublicImagesIO.Output(display_name="PUBLIC_IMAGES")],
        )

    @classmethod
    def validate_inputs(cls, folder: Any = None, resolution: Any = 512) -> bool | str:
        return check_folder_inputs(folder, resolution)

    @classmethod
    def fingerprint_inputs(cls, folder: Any = None, resolution: Any = 512) -> str:
        return _public_fingerprint(str(folder), resolution)

    @classmethod
    def execute(cls, folder, resolution) -> io.NodeOutput:
        public = load_public_images(str(folder), int(resolution))
        per_style = ", ".join(
            f"{name} {public.groups.count(i)}" for i, name in enumerate(public.styles)
        )
        lines = [
            f"{public.count} PUBLIC images at {public.resolution} px in {len(public.styles)} "
            f"style(s): {per_style}",
            "public: none is recorded as private in the ledger; nothing is recorded or spent",
        ] + [f"warning: {w}" for w in public.warnings]
        ui = _ui("Load Public Images", lines, n=public.count, styles=len(public.styles))
        return io.NodeOutput(public, ui=ui)
