"""Six of the pack's seven dpagg nodes (ComfyUI V3 API), a thin skin over ``dpagg_core``; the
seventh, **Privacy Ledger**, is in ``nodes/ledger_node.py``.

Graph: **Load Private Images** -> ``PRIVATE_IMAGES`` -> (Load Checkpoint ->) **Per-Image TI** (or
CLIP vision -> **Clip Embeddings**) -> ``EMBEDDING_SET`` -> **DP Aggregate** <- ``DP_PLAN`` <-
**Privacy Accountant**; an optional **Public Basis** (from PUBLIC images) feeds DP Aggregate.

Identity of the image set (docs/privacy.md invariant 7):

* **Load Private Images** is ``dpagg_core.io.images.load_image_folder`` on a folder of ComfyUI's
  input directory: the canonical decode (the one of ComfyUI's Load Image), sorted names, each
  picture fitted to ``resolution`` on its own. Its ``PRIVATE_IMAGES`` output carries the
  per-image digests of the FULL-SIZE decoded originals, so the dataset id - and the budget - is
  the one ``dpagg run`` computes for the same files, whatever the file names, the listing order
  or the working resolution. It is a custom type on purpose: only dpagg nodes accept it (the
  pictures are private), and it is already small (fitted), not full-size float32 photos.
* A plain ``IMAGE`` input (ComfyUI's Load Image, a batch, a list) is still accepted: its id is
  computed from the pixels received, which equals the CLI's for Load Image (same decode, no
  resize). ComfyUI's own dataset/folder loaders (``UNSTABLE_LOADERS``) list a folder unsorted,
  resize every picture to the first file's size and skip EXIF orientation, so the same pictures
  could get another id (a fresh budget) after a rename: a direct link from one of them is
  refused before anything runs, naming Load Private Images as the fix.
* Ids are keyed by the identity key of the pack's ledger (:func:`ledger_path`).

Privacy (docs/privacy.md):

* ``EMBEDDING_SET`` carries the n per-image embeddings (Clip Embeddings) or Per-Image TI's
  deferred training job (:class:`TrainingJob`: the models, the pictures, the TI config; trained
  by DP Aggregate only when the ledger has no record of the request) and ``PRIVATE_IMAGES`` the
  pictures: private data (invariant 4). They only ever live in ComfyUI's in-memory output
  cache; no node previews, saves or puts them in a UI message, the workflow or PNG metadata (the
  ``repr`` of ``PRIVATE_IMAGES`` and of a job shows no pixels, digests or vectors, should a
  generic node print it). The UI
  messages below hold public values only (the plan, n, shapes, the keyed dataset id - as
  ``dpagg ledger show`` prints it - the ledger's budget figures, the released file's name, and
  loader warnings naming files).
* Everything that sets the noise is a widget value or derived from public inputs (invariant 2):
  clip norm, centre (the initializer token's embedding, the origin, or the mean embedding of
  PUBLIC images from ``public_embeddings_file``), n (the image count), the plan.
* DP Aggregate releases through ``dpagg_core.aggregate.release.release_embeddings``: validation
  first, then the ledger's reservation (budget check -> spend committed), the CSPRNG noise, the
  stored result, then the file (invariant 5). An identical request (ComfyUI re-executing the node
  after a cache eviction or a restart) returns the recorded release and spends nothing - for a
  Per-Image TI job keyed by its inputs (``pipeline.train_and_release``; the model as patched:
  ``comfy_backend.model_key``) and answered before any training; an
  over-budget request raises ``BudgetExceeded`` before any noise is drawn, which ComfyUI shows as
  the node's error.
* The TI ``training_seed`` drives only the training randomness (invariant 3). It is not named
  ``seed`` and sets ``control_after_generate=False``, so the frontend adds no "randomize after
  each queue" control: a new seed is a new request, and the next release would spend budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from comfy_api.latest import io
from PIL import Image

from dpagg_core.aggregate.postprocess import METHODS as POSTPROCESS_METHODS
from dpagg_core.aggregate.release import (
    CENTRES,
    check_public_centre_inputs,
    release_embeddings,
)
from dpagg_core.budget_report import (
    budget_payload,
    budget_request_lines,
    fmt,
    next_release,
    plan_lines,
)
from dpagg_core.errors import DpaggError
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.io.files import folder_fingerprint
from dpagg_core.io.images import (
    LoadedImages,
    check_resolution,
    fit_images,
    identify_pictures,
    load_image_folder,
    load_images,
    look_of,
    pixel_digest,
)
from dpagg_core.io.names import sanitize_name
from dpagg_core.paths import host_ledger_path, resolve_path
from dpagg_core.privacy import accountant, calibration
from dpagg_core.privacy.accountant import SAMPLINGS, PrivacyPlan
from dpagg_core.privacy.ledger import Ledger
from dpagg_core.privacy.mechanism import CLIP_MODES, check_clip_norm
from dpagg_core.training import clip_image, ti

CATEGORY = "dpagg/privacy"
UI_KEY = "dpagg"  # key of the nodes' UI message, read by js/dpagg.js

EmbeddingSetIO = io.Custom("EMBEDDING_SET")
DpPlanIO = io.Custom("DP_PLAN")
PrivateImagesIO = io.Custom("PRIVATE_IMAGES")  # a dpagg_core.io.images.LoadedImages
PublicBasisIO = io.Custom("PUBLIC_BASIS")  # a dpagg_core.privacy.basis.PublicBasis (public)
# DP Aggregate offers every core centre (``release.CENTRES``); 'public_mean' also needs the
# ``public_embeddings_file`` input (PUBLIC per-image embeddings, `dpagg public-basis
# --save-public-embeddings FILE`), the file the CLI's `--centre public_mean --public-embeddings`
# takes.
PUBLIC_MEAN_CENTRE = "public_mean"
BASIS_SOURCES = ("token_table", "file")

# ComfyUI's dataset/folder image loaders (core nodes, 0.3.x and later): unsorted listing, every
# picture resized to the first file's size, no EXIF orientation. See the module docstring.
UNSTABLE_LOADERS = frozenset(
    {
        "LoadImageSetFromFolderNode",
        "LoadImageSetNode",
        "LoadImageTextSetFromFolderNode",
        "LoadImageDataSetFromFolder",
        "LoadImageTextDataSetFromFolder",
    }
)

MODE_TARGET = "target epsilon -> noise"
MODE_NOISE = "noise multiplier -> epsilon"
CLIP_RELEASE_SUBDIR = "dpagg_clip"


# --------------------------------------------------------------------------------------------
# Helpers (no ComfyUI imports beyond folder_paths, so the CI stub stays tiny)
# --------------------------------------------------------------------------------------------


def _first(value: Any) -> Any:
    """Unwrap a widget value of an ``is_input_list`` node (ComfyUI passes ``[value]``)."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _flatten_images(images: Any) -> list[torch.Tensor]:
    """ComfyUI IMAGE input(s) -> list of ``[H, W, C]`` images in [0, 1].

    Accepts one batch ``[B, H, W, C]`` or a list of batches (ComfyUI's dataset/folder loaders
    output lists)."""
    items = images if isinstance(images, (list, tuple)) else [images]
    out: list[torch.Tensor] = []
    for i, batch in enumerate(items):
        if not isinstance(batch, torch.Tensor) or batch.ndim not in (3, 4) or batch.shape[-1] < 3:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise DpaggError(
                f"images[{i}]: expected a ComfyUI IMAGE [batch, height, width, channels], got "
                f"{shape}; connect a Load Image / image folder node"
            )
        if batch.ndim == 3:
            batch = batch.unsqueeze(0)
        out.extend(batch[j, :, :, :3] for j in range(batch.shape[0]))
    if not out:
        raise DpaggError("images: the image set is empty; connect at least one image")
    return out


def images_dataset_id(images: Sequence[torch.Tensor]) -> tuple[str, list[str]]:
    """(keyed id, warnings) of an IMAGE set: the core's one identity step
    (``images.identify_pictures``) on the pictures' digests and perceptual hashes, under the
    pack's ledger, which learns the set's pictures so that every release is charged to each
    (same ids as the CLI: ``dpagg_core.io.images`` uses the same digest)."""
    digests, looks = [], []
    for img in images:
        arr = (img.detach().double().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        digests.append(pixel_digest(arr))
        looks.append(look_of(Image.fromarray(arr, mode="RGB")))
    names = [f"image {i}" for i in range(len(digests))]
    return identify_pictures(digests, looks, ledger=ledger_path(), names=names)


def private_images(images: Any) -> LoadedImages | None:
    """The ``PRIVATE_IMAGES`` of an images input (ComfyUI passes a list for list inputs), or
    None when the input is plain ``IMAGE`` data."""
    items = images if isinstance(images, (list, tuple)) else [images]
    found = [x for x in items if isinstance(x, LoadedImages)]
    if not found:
        return None
    if len(found) != 1 or len(items) != 1:
        raise DpaggError(
            "images: connect ONE Load Private Images output (or plain IMAGE data), not a mix"
        )
    return found[0]


def loaded_dataset_id(loaded: LoadedImages) -> str:
    """Id of a ``PRIVATE_IMAGES`` set under the pack ledger's key, from its carried digests
    (registered with the pack's ledger like any private set)."""
    names = [f"image {i}" for i in range(len(loaded.digests))]
    return identify_pictures(loaded.digests, loaded.looks, ledger=ledger_path(), names=names)[0]


def refuse_unstable_loader(hidden: Any, input_name: str = "images") -> None:
    """Raise if ``input_name`` is linked straight to one of ComfyUI's ``UNSTABLE_LOADERS``
    (read from the queued prompt; a no-op where the prompt is unknown)."""
    prompt = getattr(hidden, "prompt", None)
    uid = getattr(hidden, "unique_id", None)
    if not isinstance(prompt, dict) or uid is None:
        return
    link = (prompt.get(str(uid)) or {}).get("inputs", {}).get(input_name)
    if not (isinstance(link, (list, tuple)) and len(link) == 2):
        return
    source = (prompt.get(str(link[0])) or {}).get("class_type")
    if source in UNSTABLE_LOADERS:
        raise DpaggError(
            f"images come from ComfyUI's {source} loader, which lists the folder unsorted, resizes "
            "every picture to the size of the first file and ignores EXIF orientation: renaming "
            "or re-listing the files could give the same pictures a new dataset id, i.e. a fresh "
            "privacy budget. Use 'Load Private Images (dpagg)' on the same folder instead (its id "
            "comes from the original pictures). Nothing was trained or spent."
        )


def _input_root() -> Path:
    import folder_paths

    return Path(os.path.realpath(folder_paths.get_input_directory()))


def input_subfolders() -> list[str]:
    """Sub-folders of ComfyUI's input directory (the Load Private Images choices)."""
    import folder_paths

    try:
        return sorted(folder_paths.get_input_subfolders())
    except OSError:
        return []


def input_folder(folder: str) -> Path:
    """The sub-folder ``folder`` of ComfyUI's input directory; never a path outside it."""
    root = _input_root()
    path = Path(os.path.realpath(root / str(folder)))
    if not str(folder).strip() or path == root or root not in path.parents:
        raise DpaggError(
            f"folder={folder!r}: pick a sub-folder of ComfyUI's input directory ({root}), e.g. "
            "put the private images in input/my_private_images"
        )
    if not path.is_dir():
        raise DpaggError(f"folder={folder!r}: {path} is not a folder; put your images there")
    return path


def to_model_images(images: Sequence[torch.Tensor], resolution: int) -> torch.Tensor:
    """``[N, 3, R, R]`` in [-1, 1] (each image fitted as the CLI fits it: ``images.fit_images``),
    or the images' own size when ``resolution`` is 0 (then all must have the same size)."""
    if resolution:
        return fit_images([img.detach().float().clamp(0, 1) for img in images], int(resolution))
    out = [img.detach().float().movedim(-1, 0).unsqueeze(0).clone() * 2.0 - 1.0 for img in images]
    sizes = {tuple(x.shape[-2:]) for x in out}
    if len(sizes) > 1:
        raise DpaggError(
            f"images have different sizes {sorted(sizes)}; set resolution (e.g. 512) so every "
            "image is resized and centre-cropped to one size"
        )
    return torch.cat(out, 0)


def raise_budget_hint(path: Path, dataset_id: str) -> str:
    """How a ComfyUI user raises a budget (no `dpagg` command is on PATH in ComfyUI's install):
    the Privacy Ledger node, or the exact command with ComfyUI's own Python from the pack."""
    import sys

    pack = Path(__file__).resolve().parent.parent
    return (
        f"the 'Raise budget...' button of the Privacy Ledger node (dpagg/privacy; dataset "
        f"{dataset_id}, and the confirmation it asks for), or in a terminal: "
        f"`cd {pack} && {sys.executable} "
        f"-m dpagg_core.cli ledger set-budget --ledger {path} --dataset {dataset_id} "
        "--epsilon E --delta D`"
    )


def comfy_ledger(path: Path | None = None) -> Ledger:
    """The ledger as the nodes use it: its messages name the ComfyUI way to raise a budget."""
    return Ledger(ledger_path() if path is None else path, raise_hint=raise_budget_hint)


def ledger_path() -> Path:
    """``DPAGG_LEDGER`` if set, else ``<ComfyUI user directory>/dpagg/ledger.sqlite``
    (``paths.host_ledger_path``, as the WebUI's)."""
    import folder_paths

    return host_ledger_path(folder_paths.get_user_directory())


def embeddings_dir() -> Path:
    """ComfyUI's first ``models/embeddings`` folder (where ``embedding:<name>`` looks)."""
    import folder_paths

    return Path(folder_paths.get_folder_paths("embeddings")[0])


def clip_release_dir() -> Path:
    """Released CLIP image embeddings go to ``<output>/dpagg_clip`` (not a prompt folder)."""
    import folder_paths

    return Path(folder_paths.get_output_directory()) / CLIP_RELEASE_SUBDIR


def _ui(title: str, lines: list[str], warning: bool = False, **figures: Any) -> dict[str, list]:
    return {UI_KEY: [{"title": title, "lines": lines, "warning": warning, **figures}]}


def _progress(total: int):
    """ComfyUI progress bar; each update is also a cancel point (ComfyUI's hook raises
    InterruptProcessingException), and ``should_cancel`` raises it between steps."""
    import comfy.model_management
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)

    def progress(done: int, total: int) -> None:
        bar.update_absolute(done, total)

    def should_cancel() -> bool:
        comfy.model_management.throw_exception_if_processing_interrupted()
        return False

    return progress, should_cancel


def _stage_reporter(node_id: Any, title: str):
    """``stage(text)``: a setup stage shown on the node (ComfyUI's progress text, as nodes that
    load models do) and printed to the server log, so a long setup (model preparation, latent
    encoding: over a minute on CPU) does not look like a stalled 0 % bar. Public text only."""
    import logging

    def stage(text: str) -> None:
        logging.getLogger("dpagg").info("%s: %s", title, text)
        print(f"[dpagg] {title}: {text}", flush=True)
        try:
            from server import PromptServer

            if node_id is not None and PromptServer.instance is not None:
                PromptServer.instance.send_progress_text(f"{title}: {text}", str(node_id))
        except (ImportError, AttributeError):  # outside ComfyUI's server (tests, scripts)
            pass

    return stage


def _log_bar(total: int, title: str, progress):
    """Wrap ``progress`` so each step also advances a tqdm line in the server log, like
    KSampler's; returns (progress, close)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=f"dpagg {title}", unit="step", leave=True)

    def step(done: int, total_now: int) -> None:
        bar.total = total_now
        bar.update(done - bar.n)
        progress(done, total_now)

    return step, bar.close


def _make_backend(model: Any, clip: Any, vae: Any):
    """The TI backend on ComfyUI's objects (a seam: CI tests substitute a tiny diffusers one)."""
    from .comfy_backend import ComfyTIBackend

    return ComfyTIBackend(model, clip, vae)


def _model_key(model: Any, clip: Any, vae: Any) -> str:
    """The request key's model part: ComfyUI's objects as patched (a seam, like
    :func:`_make_backend`)."""
    from .comfy_backend import model_key

    return model_key(model, clip, vae)


def _opt(value: Any) -> float | None:
    """0 (the widget default) means "not given"."""
    value = _first(value)
    return None if value is None or float(value) == 0.0 else float(value)


def aggregate_budgets(hidden: Any) -> list[tuple[str, float | None, float | None]]:
    """(node id, budget_epsilon, budget_delta) of every DP Aggregate in the queued prompt that
    takes its plan from this node (``hidden.prompt``/``unique_id``: the API prompt, public
    widget values), so the Privacy Accountant checks the plan against the same budget."""
    prompt = getattr(hidden, "prompt", None) or {}
    me = str(getattr(hidden, "unique_id", None))
    out = []
    for node_id, node in prompt.items() if isinstance(prompt, dict) else ():
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        link = inputs.get("plan")
        if node.get("class_type") != "DpaggAggregate" or not isinstance(link, list):
            continue
        be, bd = inputs.get("budget_epsilon", 0.0), inputs.get("budget_delta", 0.0)
        if str(link[0]) == me and all(isinstance(v, (int, float)) for v in (be, bd)):
            out.append((str(node_id), _opt(be), _opt(bd)))
    return out


# --------------------------------------------------------------------------------------------
# Load Private Images
# --------------------------------------------------------------------------------------------


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
        try:  # a linked (converted) input arrives as None here; execute checks it then
            if folder is not None:
                input_folder(str(folder))
            check_resolution(int(resolution if resolution is not None else 512))
        except (DpaggError, TypeError, ValueError) as exc:
            return str(exc)
        return True

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
        more, _, figures = budget_payload(comfy_ledger(ledger), loaded.dataset_id, None)
        lines += more + [f"warning: {w}" for w in loaded.warnings]
        if loaded.notes:
            lines.append(f"{len(loaded.notes)} non-image entries skipped")
        duplicates = any(w.startswith("duplicate") for w in loaded.warnings)  # privacy: red
        ui = _ui(
            "Load Private Images",
            lines,
            duplicates,
            n=loaded.count,
            dataset=loaded.dataset_id,
            **figures,
        )
        return io.NodeOutput(loaded, ui=ui)


def _images_input(tooltip: str) -> Any:
    """``images``: Load Private Images' PRIVATE_IMAGES or any ComfyUI IMAGE (batch or list)."""
    return io.MultiType.Input(
        io.Image.Input("images", tooltip=tooltip), types=[io.Image, PrivateImagesIO]
    )


def _warn_lines(warnings: Sequence[str]) -> list[str]:
    return [f"warning: {w}" for w in warnings]


# --------------------------------------------------------------------------------------------
# Per-Image TI
# --------------------------------------------------------------------------------------------


def training_images(
    hidden: Any, images: Any, resolution: int
) -> tuple[torch.Tensor, str, list[str]]:
    """(``[N, 3, R, R]`` in [-1, 1], dataset id, warnings) of an images input.

    PRIVATE_IMAGES: its pixels (fitted again as the CLI fits pictures, ``images.fit_images``,
    only if ``resolution`` differs) and the id of its carried digests. IMAGE: with a resolution,
    the very processing of the CLI (``images.load_images``: each picture fitted with Lanczos,
    duplicate/size warnings); with 0, the images' own (common) size. Both ids come from
    full-size pictures."""
    loaded = private_images(images)
    if loaded is not None:
        x, warns = loaded.pixels, list(loaded.warnings)
        if resolution and resolution != loaded.resolution:
            if resolution > loaded.resolution:
                warns.append(
                    f"Load Private Images made {loaded.resolution} px images, upscaled here to "
                    f"{resolution} px (blurry): set its resolution to {resolution}"
                )
            x = fit_images(((x + 1) / 2).clamp(0, 1), resolution)  # the CLI's filter
        return x, loaded_dataset_id(loaded), warns
    refuse_unstable_loader(hidden)
    imgs = _flatten_images(images)
    if not resolution:
        dataset_id, warns = images_dataset_id(imgs)
        return to_model_images(imgs, 0), dataset_id, warns
    pictures = [img.detach().float().clamp(0, 1) for img in imgs]
    loaded = load_images(pictures, resolution, ledger=ledger_path())
    return loaded.pixels, loaded.dataset_id, list(loaded.warnings)


def _ti_config(kw: dict[str, Any]) -> ti.TIConfig:
    return ti.TIConfig(
        steps=int(_first(kw["steps"])),
        learning_rate=float(_first(kw["learning_rate"])),
        vectors=int(_first(kw["vectors"])),
        initializer=str(_first(kw["initializer"])),
        templates=str(_first(kw["templates"])),
        resolution=None,  # resized by the node (lists may mix sizes)
        batch_size=int(_first(kw["batch_size"])),
        seed=int(_first(kw["training_seed"])),
        gradient_checkpointing=bool(_first(kw.get("gradient_checkpointing", False))),
        mixed_precision=str(_first(kw.get("mixed_precision", "no"))),
    )


class PerImageTI(io.ComfyNode):
    """One textual-inversion embedding per image, trained on ComfyUI's own MODEL/CLIP/VAE."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DpaggPerImageTI",
            display_name="Per-Image TI (dpagg)",
            category=CATEGORY,
            description=(
                "Trains one textual-inversion embedding per image (each from its own image only) "
                "on the connected checkpoint. The result is PRIVATE: it stays in memory and only "
                "DP Aggregate turns it into a releasable embedding."
            ),
            is_input_list=True,
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                _images_input(
                    "the private images: Load Private Images (recommended: its dataset id does "
                    "not depend on file names), or an IMAGE batch / list"
                ),
                io.Int.Input("steps", default=300, min=1, max=100000, tooltip="steps per image"),
                io.Float.Input(
                    "learning_rate", default=5e-3, min=1e-6, max=1.0, step=1e-4, round=False
                ),
                io.Int.Input(
                    "vectors", default=1, min=1, max=ti.MAX_VECTORS, tooltip="vectors per token"
                ),
                io.String.Input(
                    "initializer",
                    default="painting",
                    tooltip="a one-token word; its embedding starts training and is the public "
                    "centre DP Aggregate clips around",
                ),
                io.Combo.Input("templates", options=sorted(ti.TEMPLATES), default="style"),
                io.Int.Input(
                    "resolution",
                    default=512,
                    min=0,
                    max=4096,
                    step=8,
                    tooltip="shorter side resized and centre-cropped to this; 0 keeps the size "
                    "(for Load Private Images: 0 keeps its resolution)",
                ),
                io.Int.Input("batch_size", default=4, min=1, max=256),
                io.Int.Input(
                    "training_seed",
                    default=0,
                    min=0,
                    max=2**63 - 1,
                    control_after_generate=False,
                    tooltip="training randomness only (never the DP noise); keep it fixed so a "
                    "re-run reproduces the same release instead of spending budget again",
                ),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True),
                io.Combo.Input(
                    "mixed_precision", options=["no", "bf16", "fp16"], default="no", optional=True
                ),
            ],
            outputs=[EmbeddingSetIO.Output(display_name="EMBEDDING_SET")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, **kwargs: Any) -> bool | str:
        try:
            ti.validate_config(_ti_config(kwargs))
            res = int(_first(kwargs["resolution"]))
            if res < 0 or res % 8:
                raise DpaggError(f"resolution={res}: use 0 (keep size) or a multiple of 8")
        except (DpaggError, KeyError, TypeError, ValueError) as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, model, clip, vae, images, **kwargs: Any) -> io.NodeOutput:
        config = _ti_config(kwargs)
        ti.validate_config(config)
        resolution = int(_first(kwargs["resolution"]))
        x, dataset_id, warns = training_images(cls.hidden, images, resolution)
        model, clip, vae = _first(model), _first(clip), _first(vae)
        with _make_backend(model, clip, vae) as backend:  # checks the models; changes nothing
            family, prediction = backend.model_family, backend.prediction_type
            widths = ", ".join(f"{k} {w}" for k, w in backend.embedding_dims.items())
        job = TrainingJob(
            model=model,
            clip=clip,
            vae=vae,
            pixels=x,
            config=config,
            dataset_id=dataset_id,
            node_id=getattr(cls.hidden, "unique_id", None),
        )
        lines = [
            f"{job.n} images to train one embedding each ({family}, {prediction}, "
            f"{config.vectors} vector(s), {widths})",
            "deferred: DP Aggregate trains them only if the ledger has no record of this exact "
            "request (a recorded one is answered untrained, spending nothing)",
            "private: kept in memory only; release them with DP Aggregate",
            f"image set {dataset_id}",
        ] + _warn_lines(warns)
        ui = _ui("Per-Image TI", lines, dataset=dataset_id, prediction=prediction)
        return io.NodeOutput(job, ui=ui)


class TrainingJob:
    """Per-Image TI's ``EMBEDDING_SET``: the training it deferred (issue 19 item 2). It carries
    the MODEL/CLIP/VAE objects, the private pixels ``[n, 3, R, R]``, the TI config and the image
    set's id, and trains only when asked: DP Aggregate first asks the ledger for the identical
    request (the pipeline: ``dpagg_core.pipeline.train_and_release``) and trains on
    ``NotRecorded`` only, so nothing trains on a recorded request. Any other consumer calls
    :meth:`materialize` (trains once; the set is kept, as ComfyUI kept Per-Image TI's output).

    Private like an ``EmbeddingSet`` (docs/privacy.md invariant 4): in memory only; ``repr``
    shows public labels only. ``n``, ``dataset_id`` and ``kind`` are public (the Privacy
    Accountant reads them without training). The pipeline sees it as its images (``pixels``,
    ``count``, ``dataset_id``) and, through :meth:`trainer`, as its trainer."""

    kind = "textual_inversion"

    def __init__(
        self,
        *,
        model: Any,
        clip: Any,
        vae: Any,
        pixels: torch.Tensor,
        config: ti.TIConfig,
        dataset_id: str,
        node_id: Any = None,
    ) -> None:
        self._models = (model, clip, vae)
        self.pixels = pixels
        self.config = config
        self.dataset_id = dataset_id
        self.node_id = node_id
        self._eset: EmbeddingSet | None = None
        self._model_key: str | None = None
        self.trained_here = 0  # trainings run by this job (tests, node messages)

    @property
    def n(self) -> int:
        return int(self.pixels.shape[0])

    count = n

    @property
    def resolution(self) -> int:
        return int(self.pixels.shape[-1])

    def __repr__(self) -> str:
        return (
            f"TrainingJob(kind={self.kind!r}, n={self.n}, resolution={self.resolution}, "
            f"dataset_id={self.dataset_id!r}, trained={self._eset is not None}; the images "
            "and per-image vectors are private and not shown)"
        )

    def model_weights(self) -> str:
        """The request key's model part: the models as patched (computed once per job)."""
        if self._model_key is None:
            self._model_key = _model_key(*self._models)
        return self._model_key

    @contextlib.contextmanager
    def trainer(self, node_id: Any = None) -> Iterator[_JobTrainer]:
        """The pipeline's trainer over this job's models (ComfyUI's objects are restored on
        leaving): progress and stage text go to ``node_id`` (the running node)."""
        with _make_backend(*self._models) as backend:
            yield _JobTrainer(self, backend, self.node_id if node_id is None else node_id)

    def materialize(self, node_id: Any = None) -> EmbeddingSet:
        """The trained per-image set (trains on the first call)."""
        if self._eset is None:
            with self.trainer(node_id) as trainer:
                trainer.train(self)
        assert self._eset is not None
        return self._eset


class _JobTrainer:
    """``pipeline`` trainer of a :class:`TrainingJob`: per-image TI on ComfyUI's objects with
    ComfyUI's progress bar (each update a cancel point), the Interrupt button polled before
    every step, setup stages on the node and a tqdm line in the server log."""

    method = "ti"

    def __init__(self, job: TrainingJob, backend: Any, node_id: Any) -> None:
        self.job, self.backend, self.node_id = job, backend, node_id
        self.config = job.config
        self.resolution = job.resolution
        self.model_weights = job.model_weights()

    def train(self, loaded: Any) -> EmbeddingSet:
        job = self.job
        if job._eset is not None:  # trained before (ComfyUI kept this job): no second training
            return job._eset
        chunks = math.ceil(job.n / self.config.batch_size)
        progress, should_cancel = _progress(self.config.steps * chunks)
        stage = _stage_reporter(self.node_id, "Per-Image TI")
        progress, close_bar = _log_bar(self.config.steps * chunks, "Per-Image TI", progress)
        with torch.inference_mode(False):
            x = job.pixels.clone()  # a normal tensor (ComfyUI runs nodes in inference mode)
            stage(f"{x.shape[0]} images; recording the model's state (restored afterwards)")
            try:
                eset = ti.train_embeddings(
                    self.backend,
                    x,
                    self.config,
                    dataset_id=job.dataset_id,
                    progress=progress,
                    should_cancel=should_cancel,
                    stage=stage,
                )
            finally:
                close_bar()
        stage("done")
        job._eset = eset
        job.trained_here += 1
        return eset


# --------------------------------------------------------------------------------------------
# Clip Embeddings
# --------------------------------------------------------------------------------------------


class ClipEmbeddings(io.ComfyNode):
    """One CLIP image embedding per image (ComfyUI's own CLIP vision encoder)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DpaggClipEmbeddings",
            display_name="Clip Embeddings (dpagg)",
            category=CATEGORY,
            description=(
                "Encodes every image with the CLIP vision model into an EMBEDDING_SET of kind "
                "clip_image. PRIVATE: kept in memory; release it with DP Aggregate."
            ),
            is_input_list=True,
            inputs=[
                io.ClipVision.Input("clip_vision"),
                _images_input("the private images: Load Private Images, or an IMAGE batch / list"),
                io.Combo.Input("crop", options=["center", "none"], default="center"),
            ],
            outputs=[EmbeddingSetIO.Output(display_name="EMBEDDING_SET")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, clip_vision, images, crop) -> io.NodeOutput:
        clip_vision, crop = _first(clip_vision), _first(crop)
        if clip_vision is None:
            raise DpaggError("clip_vision is missing: connect a Load CLIP Vision node")
        loaded = private_images(images)
        if loaded is not None:  # [N, 3, R, R] in [-1, 1] -> ComfyUI images [R, R, 3] in [0, 1]
            imgs = [((row.movedim(0, -1) + 1) / 2).clamp(0, 1) for row in loaded.pixels]
            dataset_id = loaded_dataset_id(loaded)
        else:
            refuse_unstable_loader(cls.hidden)
            imgs = _flatten_images(images)
            dataset_id = images_dataset_id(imgs)[0]
        progress, should_cancel = _progress(len(imgs))
        rows = []
        for i, img in enumerate(imgs):  # one image at a time: row i depends on image i only
            should_cancel()
            out = clip_vision.encode_image(img.unsqueeze(0), crop=crop == "center")
            rows.append(out["image_embeds"].reshape(1, -1))
            progress(i + 1, len(imgs))
        model_id = clip_image.vision_model_id(getattr(clip_vision, "model", None))
        eset = clip_image.clip_image_set(rows, base_model_id=model_id, dataset_id=dataset_id)
        lines = [
            f"{eset.n} CLIP image embeddings (width {eset.encoder_widths['image_embeds']})",
            "private: kept in memory only; release them with DP Aggregate",
            f"image set {dataset_id}",
        ]
        return io.NodeOutput(eset, ui=_ui("Clip Embeddings", lines, dataset=dataset_id))


# --------------------------------------------------------------------------------------------
# Privacy Accountant
# --------------------------------------------------------------------------------------------


def plan_arguments(kw: dict[str, Any], n: int | None = None) -> dict[str, Any]:
    """The Privacy Accountant's widgets as the keyword arguments of the core's
    ``calibration.plan_from_inputs`` / ``check_inputs`` (``n`` replaces the widget's n)."""
    target = kw["mode"] == MODE_TARGET
    return {
        "n": int(kw["n"]) if n is None else int(n),
        "delta": float(kw["delta"]),
        "epsilon": float(kw["epsilon"]) if target else None,
        "noise_multiplier": None if target else float(kw["noise_multiplier"]),
        "sampling": kw["sampling"],
        "m": int(kw["m"]),
        "q": float(kw["q"]),
        "releases": int(kw["releases"]),
    }


def accountant_problems(kw: dict[str, Any], n_known: bool) -> str | None:
    """Cheap checks of the accountant's widgets, before anything runs (None if fine): the core's
    ``calibration.check_inputs`` (a plan's own rules), those that involve n only when n is the
    widget's (``n_known``), not the linked set's."""
    mode = kw.get("mode")
    if mode not in (MODE_TARGET, MODE_NOISE):
        return f"mode={mode!r}: use {MODE_TARGET!r} or {MODE_NOISE!r}"
    try:
        args = plan_arguments(kw)
    except (KeyError, TypeError, ValueError) as exc:
        return f"bad or missing parameter: {exc}"
    try:
        calibration.check_inputs(**args, n_known=n_known)
    except DpaggError as exc:
        return str(exc)
    return None


class PrivacyAccountant(io.ComfyNode):
    """Noise <-> epsilon for a planned release (dp-accounting), as a DP_PLAN."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DpaggPrivacyAccountant",
            display_name="Privacy Accountant (dpagg)",
            category=CATEGORY,
            description=(
                "Plans a DP release: the least noise for a target epsilon, or the epsilon of a "
                "given noise multiplier. n comes from the EMBEDDING_SET when connected. With a "
                "set connected it checks the plan against the image set's budget as the DP "
                "Aggregate it feeds will (same ledger, same budget_epsilon/budget_delta)."
            ),
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
            inputs=[
                io.Combo.Input("mode", options=[MODE_TARGET, MODE_NOISE], default=MODE_TARGET),
                io.Float.Input(
                    "epsilon", default=4.0, min=0.001, max=1000.0, step=0.1, tooltip="target"
                ),
                io.Float.Input(
                    "noise_multiplier",
                    default=1.0,
                    min=0.001,
                    max=10000.0,
                    step=0.01,
                    tooltip="noise std / L2 sensitivity (used in the noise -> epsilon mode)",
                ),
                io.Float.Input(
                    "delta",
                    default=accountant.DEFAULT_DELTA,
                    min=1e-12,
                    max=0.5,
                    step=1e-6,
                    round=False,
                    tooltip="probability that the guarantee may fail outright; keep the default "
                    "1e-5 (a larger delta is shown as a warning on this node)",
                ),
                io.Int.Input(
                    "n", default=8, min=1, max=10**9, tooltip="used when no set is connected"
                ),
                io.Combo.Input("sampling", options=list(SAMPLINGS), default="full"),
                io.Int.Input("m", default=4, min=1, max=10**9, tooltip="sample size (wor)"),
                io.Float.Input(
                    "q",
                    default=0.5,
                    min=1e-6,
                    max=1.0,
                    step=0.01,
                    round=False,
                    tooltip="sampling rate (poisson)",
                ),
                io.Int.Input("releases", default=1, min=1, max=10**6),
                EmbeddingSetIO.Input("embedding_set", optional=True),
            ],
            outputs=[
                DpPlanIO.Output(display_name="DP_PLAN"),
                io.String.Output(display_name="summary"),
            ],
        )

    @classmethod
    def validate_inputs(cls, **kwargs: Any) -> bool | str:
        problem = accountant_problems(kwargs, n_known="embedding_set" not in kwargs)
        return True if problem is None else problem

    @classmethod
    def execute(
        cls,
        mode,
        epsilon,
        noise_multiplier,
        delta,
        n,
        sampling,
        m,
        q,
        releases,
        embedding_set=None,
    ) -> io.NodeOutput:
        linked = isinstance(embedding_set, (EmbeddingSet, TrainingJob))  # n, id: no training
        n_eff = embedding_set.n if linked else int(n)
        widgets = dict(mode=mode, epsilon=epsilon, noise_multiplier=noise_multiplier, n=n)
        widgets.update(delta=delta, sampling=sampling, m=m, q=q, releases=releases)
        plan = calibration.plan_from_inputs(**plan_arguments(widgets, n_eff))
        summary = accountant.plan_summary(plan)
        lines = plan_lines(plan)
        delta_warning = accountant.delta_warning(plan.delta, n_eff)
        if delta_warning:
            lines = [f"WARNING: {delta_warning}", *lines]
            summary = f"WARNING: {delta_warning}\n{summary}"
        warning = delta_warning is not None
        figures: dict[str, Any] = {"delta_warning": delta_warning}
        if linked and embedding_set.dataset_id:
            ledger, ds = comfy_ledger(), embedding_set.dataset_id
            targets = aggregate_budgets(cls.hidden) or [("", None, None)]
            _, be, bd = targets[0]
            more, over, budget_figures = budget_payload(ledger, ds, None, be, bd)
            refusals = []
            for node_id, be, bd in targets:  # DP Aggregate's own check, as a dry run
                refused = next_release(ledger, ds, plan, be, bd).get("refused")
                if refused is not None:
                    where = f"DP Aggregate (node {node_id})" if node_id else "DP Aggregate"
                    refusals.append(f"WARNING: {where} will refuse this plan: {refused}")
            lines += more + refusals
            warning = warning or bool(refusals)
            figures.update(budget_figures)
            figures["will_be_refused"] = figures["next_release_exceeds"] = bool(refusals)
        return io.NodeOutput(
            plan,
            summary,
            ui=_ui("Privacy Accountant", lines, warning, plan=plan.to_dict(), **figures),
        )


# --------------------------------------------------------------------------------------------
# Public Basis
# --------------------------------------------------------------------------------------------


def _checkpoint_tables(model: Any, clip: Any) -> tuple[str, str, dict[str, torch.Tensor]]:
    """(family, base-model id, token tables) of ComfyUI's MODEL/CLIP, the id as Per-Image TI
    records it (a seam: CI tests substitute tiny tables)."""
    from .comfy_backend import checkpoint_tables

    return checkpoint_tables(model, clip)


def basis_lines(basis: Any) -> list[str]:
    """Public description of a basis for a node message."""
    return [
        f"public basis: {basis.kind}, k = {basis.k} per vector x {basis.vectors} vector(s): "
        f"noise on K = {basis.dim} of D = {basis.flat_dim} coordinates "
        f"(noise norm x{math.sqrt(basis.dim / basis.flat_dim):.2f})",
        f"model {basis.base_model_id or '(unnamed)'}, sha256 {basis.sha256[:16]}",
    ]


def release_shaping(
    record: dict[str, str], plan: PrivacyPlan, clip_norm: float, flat_dim: int
) -> tuple[list[str], dict[str, Any]]:
    """Node lines and UI figures for a release's public basis and post-processing (public
    values from its record and plan only)."""
    lines: list[str] = []
    figures: dict[str, Any] = {}
    sigma = plan.noise_std(clip_norm)
    if record.get("centre_sha256"):
        lines.append(
            f"centre {record.get('centre')}: sha256 {record['centre_sha256'][:16]}... (public)"
        )
        figures["centre"] = {"kind": record.get("centre"), "sha256": record["centre_sha256"]}
    if record.get("basis_dim"):
        k_dim = int(record["basis_dim"])
        ratio = math.sqrt(k_dim / flat_dim)
        lines.append(
            f"basis {record['basis_kind']}, k = {record['basis_k']}: noise on K = {k_dim} of "
            f"D = {flat_dim} coordinates, noise norm ~{fmt(sigma * math.sqrt(k_dim))} instead "
            f"of ~{fmt(sigma * math.sqrt(flat_dim))} (x{ratio:.2f})"
        )
        figures["basis"] = {
            "kind": record["basis_kind"],
            "k": int(record["basis_k"]),
            "K": k_dim,
            "D": int(flat_dim),
            "sha256": record["basis_sha256"],
            "noise_norm_ratio": ratio,
        }
    if record.get("postprocess"):
        post = record["postprocess"]
        more = ""
        if "postprocess_js_factor" in record:
            more = f" (James-Stein factor {float(record['postprocess_js_factor']):.3f})"
        lines.append(f"post-processing: {post}{more}; no privacy cost")
        figures["postprocess"] = post
    return lines, figures


class PublicBasisNode(io.ComfyNode):
    """A PUBLIC subspace basis for DP Aggregate: from the checkpoint's token table or a file."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DpaggPublicBasis",
            display_name="Public Basis (dpagg)",
            category=CATEGORY,
            description=(
                "A public orthonormal basis (k directions per vector) for DP Aggregate, which "
                "then adds its noise on k instead of all coordinates. token_table: the top-k "
                "principal directions of the connected checkpoint's token-embedding table "
                "(public: it ships with the model). file: a basis written by `dpagg "
                "public-basis` (e.g. from embeddings of PUBLIC images). Never built from the "
                "private images."
            ),
            inputs=[
                io.Combo.Input("source", options=list(BASIS_SOURCES), default="token_table"),
                io.Int.Input("k", default=8, min=1, max=1280, tooltip="directions per vector"),
                io.Int.Input(
                    "vectors",
                    default=1,
                    min=1,
                    max=ti.MAX_VECTORS,
                    tooltip="vectors per token: the same as Per-Image TI's",
                ),
                io.String.Input(
                    "basis_file",
                    default="",
                    tooltip="for source=file: a .safetensors basis file (`dpagg public-basis`)",
                ),
                io.Model.Input("model", optional=True, tooltip="for source=token_table"),
                io.Clip.Input("clip", optional=True, tooltip="for source=token_table"),
            ],
            outputs=[PublicBasisIO.Output(display_name="PUBLIC_BASIS")],
        )

    @classmethod
    def validate_inputs(cls, **kwargs: Any) -> bool | str:
        source = kwargs.get("source")
        if source not in BASIS_SOURCES:
            return f"source={source!r}: use one of {list(BASIS_SOURCES)}"
        if source == "file" and not str(kwargs.get("basis_file", "")).strip():
            return "basis_file: give the basis file (`dpagg public-basis --out FILE`)"
        return True

    @classmethod
    def execute(cls, source, k, vectors, basis_file, model=None, clip=None) -> io.NodeOutput:
        from dpagg_core.aggregate.basis_builders import basis_from_token_table, load_basis

        if source == "file":
            basis = load_basis(resolve_path(str(basis_file)))
        elif source == "token_table":
            family, model_id, tables = _checkpoint_tables(model, clip)
            basis = basis_from_token_table(
                tables, int(k), vectors=int(vectors), model_family=family, base_model_id=model_id
            )
        else:
            raise DpaggError(f"source={source!r}: use one of {list(BASIS_SOURCES)}")
        info = {
            "kind": basis.kind,
            "k": basis.k,
            "K": basis.dim,
            "D": basis.flat_dim,
            "vectors": basis.vectors,
            "base_model_id": basis.base_model_id,
            "sha256": basis.sha256,
        }
        return io.NodeOutput(basis, ui=_ui("Public Basis", basis_lines(basis), basis=info))


# --------------------------------------------------------------------------------------------
# DP Aggregate
# --------------------------------------------------------------------------------------------


class DPAggregate(io.ComfyNode):
    """Release ONE differentially private mean of an EMBEDDING_SET, recorded in the ledger."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DpaggAggregate",
            display_name="DP Aggregate (dpagg)",
            category=CATEGORY,
            description=(
                "Clips every per-image embedding around a public centre, averages them, adds "
                "Gaussian noise from the DP_PLAN and records the release in the privacy ledger "
                "(ComfyUI user folder). Writes models/embeddings/<name>.safetensors under a new "
                "name per release and outputs the exact 'embedding:<name>' text for the prompt."
            ),
            inputs=[
                EmbeddingSetIO.Input("embedding_set"),
                DpPlanIO.Input("plan"),
                io.Float.Input(
                    "clip_norm",
                    default=1.0,
                    min=1e-6,
                    max=1e6,
                    step=0.01,
                    round=False,
                    tooltip="C: every embedding is clipped to distance C from the centre. Choose "
                    "it from public data, never from these images",
                ),
                io.Combo.Input(
                    "centre",
                    options=list(CENTRES),
                    default="initializer",
                    tooltip="public centre to clip around: initializer (the initializer token's "
                    "embedding), origin, or public_mean (the mean embedding of PUBLIC images, "
                    "from public_embeddings_file)",
                ),
                io.String.Input("name", default="mystyle", tooltip="base file name"),
                io.Combo.Input("mode", options=list(CLIP_MODES), default="clip"),
                io.Float.Input(
                    "budget_epsilon",
                    default=0.0,
                    min=0.0,
                    max=1000.0,
                    step=0.1,
                    tooltip="total epsilon budget of this image set; 0 keeps the recorded budget "
                    "(the first release records its own epsilon unless set here)",
                ),
                io.Float.Input(
                    "budget_delta", default=0.0, min=0.0, max=0.5, step=1e-6, round=False
                ),
                PublicBasisIO.Input(
                    "basis",
                    optional=True,
                    tooltip="optional PUBLIC basis (Public Basis node): clip, average and add "
                    "the noise in its k directions per vector instead of all D coordinates",
                ),
                io.Combo.Input(
                    "postprocess",
                    options=list(POSTPROCESS_METHODS),
                    default="none",
                    optional=True,
                    tooltip="free post-processing of the release (no privacy cost): js = "
                    "James-Stein shrinkage toward the centre; norm = rescale to the basis' "
                    "typical norm",
                ),
                io.String.Input(
                    "public_embeddings_file",
                    default="",
                    optional=True,
                    tooltip="for centre=public_mean only: a .safetensors file of per-image "
                    "embeddings of PUBLIC images ONLY (never these private images), written by "
                    "`dpagg public-basis --public-images DIR --save-public-embeddings FILE` - "
                    "the same file the CLI's `--centre public_mean --public-embeddings FILE` "
                    "takes. Their mean is the centre; a private file is refused",
                ),
            ],
            hidden=[io.Hidden.unique_id],
            outputs=[
                io.String.Output(display_name="prompt", tooltip="embedding:<name>"),
                io.ClipVisionOutput.Output(
                    display_name="CLIP_VISION_OUTPUT", tooltip="for Clip Embeddings sets"
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, **kwargs: Any) -> bool | str:
        try:
            sanitize_name(str(kwargs.get("name", "")))
        except DpaggError as exc:
            return f"name: {exc}"
        try:
            check_clip_norm(float(kwargs.get("clip_norm", 0)))
        except (DpaggError, TypeError, ValueError) as exc:
            return f"{exc} Choose C from public data, never from these images."
        problem = check_public_centre_inputs(
            kwargs.get("centre"), kwargs.get("public_embeddings_file", "")
        )
        if problem:
            return problem
        if kwargs.get("postprocess", "none") not in POSTPROCESS_METHODS:
            return f"postprocess={kwargs.get('postprocess')!r}: use one of {POSTPROCESS_METHODS}"
        if kwargs.get("mode") not in CLIP_MODES:
            return f"mode={kwargs.get('mode')!r}: use one of {list(CLIP_MODES)}"
        be, bd = float(kwargs.get("budget_epsilon", 0)), float(kwargs.get("budget_delta", 0))
        if be < 0 or not math.isfinite(be):
            return f"budget_epsilon={be}: use 0 (keep the recorded budget) or a positive number"
        if not 0 <= bd < 1:
            return f"budget_delta={bd}: use 0 (keep the recorded budget) or a number in (0, 1)"
        return True

    @classmethod
    def execute(
        cls,
        embedding_set,
        plan,
        clip_norm,
        centre,
        name,
        mode,
        budget_epsilon,
        budget_delta,
        basis=None,
        postprocess="none",
        public_embeddings_file="",
    ) -> io.NodeOutput:
        from comfy_execution.graph_utils import ExecutionBlocker

        from dpagg_core.privacy.basis import PublicBasis as CoreBasis

        if not isinstance(embedding_set, (EmbeddingSet, TrainingJob)):
            raise DpaggError("embedding_set: connect Per-Image TI or Clip Embeddings")
        if not isinstance(plan, PrivacyPlan):
            raise DpaggError("plan: connect a Privacy Accountant")
        if basis is not None and not isinstance(basis, CoreBasis):
            raise DpaggError("basis: connect a Public Basis node (or leave it unconnected)")
        eset = embedding_set
        if plan.n != eset.n:
            raise DpaggError(
                f"the DP_PLAN was made for n={plan.n} images but the EMBEDDING_SET holds "
                f"{eset.n}: connect the set to the Privacy Accountant's embedding_set input (or "
                f"set its n to {eset.n}). Nothing was spent."
            )
        # Checked again here (validate_inputs may be bypassed), before the ledger is touched;
        # release_embeddings loads the file and refuses a private one before reserving.
        problem = check_public_centre_inputs(centre, public_embeddings_file)
        if problem:
            raise DpaggError(problem)
        public_centre = (
            resolve_path(str(public_embeddings_file).strip())
            if centre == PUBLIC_MEAN_CENTRE
            else None
        )
        is_ti = eset.kind == "textual_inversion"
        ledger = comfy_ledger()
        be, bd = _opt(budget_epsilon), _opt(budget_delta)
        options: dict[str, Any] = {
            "clip_norm": float(clip_norm),
            "name": str(name),
            "out_dir": embeddings_dir() if is_ti else clip_release_dir(),
            "centre": str(centre),
            "mode": str(mode),
            "budget_epsilon": be,
            "budget_delta": bd,
            "new_name_per_release": True,
            "basis": basis,
            "postprocess": str(postprocess or "none"),
            "public_centre": public_centre,
        }
        trained: bool | None = None
        if isinstance(eset, TrainingJob):
            # The pipeline: the ledger's record of the identical request first (nothing
            # trained), else the budget check, the training (this node's progress bar and
            # Interrupt), then the release keyed by the same inputs.
            outcome, trained = _release_job(eset, plan, ledger, cls, options)
        else:
            outcome = release_embeddings(eset, plan=plan, ledger=ledger, **options)
        more, warning, figures = budget_payload(ledger, eset.dataset_id, plan, be, bd)
        state = "reused (nothing spent)" if outcome.reused else "new release"
        lines = [f"{outcome.prompt if is_ti else outcome.name}: {state}"]
        if trained is not None:
            lines.append(
                f"trained {eset.n} per-image embeddings for it"
                if trained
                else "answered from the ledger's record: nothing trained, nothing spent"
            )
            figures["trained"] = trained
        lines += budget_request_lines(figures.get("budget"), be, bd, outcome.reused)
        lines += plan_lines(plan)
        flat_dim = sum(int(t.numel()) for t in outcome.vectors.values())
        shaping, extra = release_shaping(outcome.record, plan, float(clip_norm), flat_dim)
        lines += shaping + more
        figures.update(extra)
        text = outcome.prompt if is_ti else outcome.name
        if is_ti:
            vision: Any = ExecutionBlocker(
                "DP Aggregate: CLIP_VISION_OUTPUT is only produced for Clip Embeddings sets"
            )
        else:
            from comfy.clip_vision import Output

            vision = Output()
            vision["image_embeds"] = outcome.vectors["image_embeds"].reshape(1, -1).clone()
        ui = _ui(
            "DP Aggregate",
            lines,
            warning,
            name=outcome.name,
            prompt=text,
            reused=outcome.reused,
            plan=plan.to_dict(),
            **figures,
        )
        return io.NodeOutput(text, vision, ui=ui)


def _release_job(
    job: TrainingJob, plan: PrivacyPlan, ledger: Ledger, node: Any, options: dict[str, Any]
) -> tuple[Any, bool]:
    """(outcome, trained) of DP Aggregate on Per-Image TI's deferred job, through the core
    pipeline (``pipeline.train_and_release``): an identical request recorded in the ledger is
    answered from its record and nothing trains."""
    import comfy.model_management

    from dpagg_core.pipeline import train_and_release

    node_id = getattr(getattr(node, "hidden", None), "unique_id", None)
    before = job.trained_here
    with job.trainer(node_id) as trainer:
        outcome = train_and_release(
            trainer,
            job,
            plan,
            ledger=ledger,
            before_release=comfy.model_management.throw_exception_if_processing_interrupted,
            **options,
        )
    if outcome is None:  # pragma: no cover - torchrun ranks only
        raise DpaggError("internal: the pipeline returned no release")
    trained = job.trained_here > before
    if not trained:
        stage = _stage_reporter(node_id, "DP Aggregate")
        stage(
            "answered from the ledger's record of this request: nothing trained, nothing spent"
            if outcome.reused
            else "released the per-image embeddings Per-Image TI trained before"
        )
    return outcome, trained


NODES: tuple[type[io.ComfyNode], ...] = (
    LoadPrivateImages,
    PerImageTI,
    ClipEmbeddings,
    PrivacyAccountant,
    PublicBasisNode,
    DPAggregate,
)
