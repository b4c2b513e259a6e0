"""Shared skin helpers of the pack's seven dpagg nodes (ComfyUI V3 API, a thin skin over
``dpagg_core``): the custom types, the category, widget constants, the images inputs and their
identity, ComfyUI's folders, the ledger as the nodes open it, UI messages and progress. Each
node has its own module: ``load_private_images``, ``per_image_ti``, ``clip_embeddings``,
``privacy_accountant``, ``public_basis``, ``dp_aggregate`` and ``ledger_node``.

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
  ``comfy_model_key.model_key``) and answered before any training; an
  over-budget request raises ``BudgetExceeded`` before any noise is drawn, which ComfyUI shows as
  the node's error.
* The TI ``training_seed`` drives only the training randomness (invariant 3). It is not named
  ``seed`` and sets ``control_after_generate=False``, so the frontend adds no "randomize after
  each queue" control: a new seed is a new request, and the next release would spend budget.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from comfy_api.latest import io
from PIL import Image

from dpagg_core.errors import DpaggError
from dpagg_core.io.images import (
    LoadedImages,
    check_resolution,
    fit_images,
    identify_pictures,
    look_of,
    pixel_digest,
)
from dpagg_core.paths import host_ledger_path
from dpagg_core.privacy.ledger import Ledger

CATEGORY = "dpagg/privacy"
UI_KEY = "dpagg"  # key of the nodes' UI message, read by js/dpagg.js

EmbeddingSetIO = io.Custom("EMBEDDING_SET")
DpPlanIO = io.Custom("DP_PLAN")
PrivateImagesIO = io.Custom("PRIVATE_IMAGES")  # a dpagg_core.io.images.LoadedImages
PublicBasisIO = io.Custom("PUBLIC_BASIS")  # a dpagg_core.privacy.basis.PublicBasis (public)
PublicImagesIO = io.Custom("PUBLIC_IMAGES")  # a load_public_images.PublicImages (public)
# a dpagg_core.training.public.PublicBasisBuild: PUBLIC per-image embeddings with their styles
PublicEmbeddingsIO = io.Custom("PUBLIC_EMBEDDINGS")
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


def one_loader_output(images: Any, kind: type, mix_error: str) -> Any:
    """The one ``kind`` object (a loader node's output) of an images input (ComfyUI passes a
    list for list inputs), or None when there is none; ``mix_error`` when it comes with others."""
    items = images if isinstance(images, (list, tuple)) else [images]
    found = [x for x in items if isinstance(x, kind)]
    if not found:
        return None
    if len(found) != 1 or len(items) != 1:
        raise DpaggError(mix_error)
    return found[0]


def private_images(images: Any) -> LoadedImages | None:
    """The ``PRIVATE_IMAGES`` of an images input, or None when it is plain ``IMAGE`` data."""
    return one_loader_output(
        images,
        LoadedImages,
        "images: connect ONE Load Private Images output (or plain IMAGE data), not a mix",
    )


def refit(pixels: torch.Tensor, resolution: int) -> torch.Tensor:
    """Loader pixels (``[N, 3, R, R]`` in [-1, 1]) at another ``resolution``, fitted with the
    CLI's filter (``images.fit_images``)."""
    return fit_images(((pixels + 1) / 2).clamp(0, 1), resolution)


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

    def stage(text: str) -> None:
        stage.last = text  # type: ignore[attr-defined]  # the ETA line repeats it
        logging.getLogger("dpagg").info("%s: %s", title, text)
        print(f"[dpagg] {title}: {text}", flush=True)
        _node_text(node_id, f"{title}: {text}")

    stage.last = ""  # type: ignore[attr-defined]
    stage.node_id = node_id  # type: ignore[attr-defined]
    stage.title = title  # type: ignore[attr-defined]
    return stage


def _node_text(node_id: Any, text: str) -> None:
    """Show ``text`` on the node (ComfyUI's progress text, drawn on the node by its frontend)."""
    try:
        from server import PromptServer

        if node_id is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, str(node_id))
    except (ImportError, AttributeError):  # outside ComfyUI's server (tests, scripts)
        pass


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def eta_text(done: int, total: int, elapsed: float) -> str:
    """ "step 3 of 8, 0:12 elapsed, about 0:20 left" (the rate so far; issue 20 item 7: the ETA
    was only in the server log's tqdm line)."""
    if done <= 0 or total <= 0:
        return f"step 0 of {total}, {_clock(elapsed)} elapsed"
    left = elapsed / done * max(0, total - done)
    return f"step {done} of {total}, {_clock(elapsed)} elapsed, about {_clock(left)} left"


def _log_bar(total: int, title: str, progress, stage: Any = None, every_s: float = 1.0):
    """Wrap ``progress`` so each step also advances a tqdm line in the server log, like
    KSampler's, and (with ``stage``, a :func:`_stage_reporter`) shows the ETA on the node: the
    current stage text and :func:`eta_text`, at most every ``every_s`` seconds and at the last
    step; returns (progress, close)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=f"dpagg {title}", unit="step", leave=True)
    start = time.monotonic()
    shown = [-float("inf")]

    def step(done: int, total_now: int) -> None:
        bar.total = total_now
        bar.update(done - bar.n)
        progress(done, total_now)
        now = time.monotonic()
        if stage is not None and (now - shown[0] >= every_s or done >= total_now):
            shown[0] = now
            what = f"{stage.last} - " if getattr(stage, "last", "") else ""
            eta = eta_text(done, total_now, now - start)
            _node_text(getattr(stage, "node_id", None), f"{title}: {what}{eta}")

    return step, bar.close


def _opt(value: Any) -> float | None:
    """0 (the widget default) means "not given"."""
    value = _first(value)
    return None if value is None or float(value) == 0.0 else float(value)


def clip_norm_input(tooltip: str) -> Any:
    """The clip norm C widget (DP Aggregate, Rehearse; linkable from Public Style's C)."""
    return io.Float.Input(
        "clip_norm", default=1.0, min=1e-6, max=1e6, step=0.01, round=False, tooltip=tooltip
    )


def check_folder_inputs(folder: Any, resolution: Any) -> bool | str:
    """validate_inputs of a folder loader (Load Private / Public Images): the sub-folder of
    ComfyUI/input and the resolution; a linked (converted) input arrives as None and is checked
    by execute."""
    try:
        if folder is not None:
            input_folder(str(folder))
        check_resolution(int(resolution if resolution is not None else 512))
    except (DpaggError, TypeError, ValueError) as exc:
        return str(exc)
    return True


def _images_input(tooltip: str, public: bool = False) -> Any:
    """``images``: Load Private Images' PRIVATE_IMAGES or any ComfyUI IMAGE (batch or list);
    with ``public``, also Load Public Images' PUBLIC_IMAGES (Per-Image TI)."""
    types = [io.Image, PrivateImagesIO] + ([PublicImagesIO] if public else [])
    return io.MultiType.Input(io.Image.Input("images", tooltip=tooltip), types=types)
