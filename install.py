"""Installer for the Stable Diffusion WebUI extension (AUTOMATIC1111 / Forge run it at start).

Installs only what ``dpagg_core`` needs and the host lacks, with the WebUI's own helper
``launch.run_pip`` (plain ``pip`` when run elsewhere, e.g. by ComfyUI-Manager):

- ``requirements.txt`` into the host's environment;
- dp-accounting, unless ``dp_accounting`` is importable already, with ``--no-deps --target
  <pack>/_deps``: a git-ignored folder of the pack that pip does not treat as part of the
  environment. Every dp-accounting release pins attrs<24; installed into the environment, even
  with ``--no-deps``, its metadata would make ``pip check`` report the host's newer attrs
  (ComfyUI has attrs 26). Its other dependencies are in ``requirements.txt``; ``dpagg_core``
  appends ``_deps`` to ``sys.path`` when it needs it (``dpagg_core/__init__.py``).

So installing the pack changes no installed package and leaves ``pip check`` as it was (the
real-ComfyUI CI, ``.ci/comfyui``, checks both). It never installs, upgrades or downgrades the
packages the WebUI pins: torch, torchvision, transformers, diffusers, numpy and Pillow are passed
to pip as constraints at their installed versions, so a dependency that wanted another version
makes pip fail instead of changing the WebUI. With everything present (``_deps`` included) it runs
no pip at all (works offline).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The CLIP BPE vocabulary: any of these packages ships it (A1111/Forge have open-clip-torch).
CLIP_VOCAB_PROVIDERS = ("clip", "open_clip")
CLIP_VOCAB_SPEC = ("clip-anytorch", ("--no-deps",))
# Versions the WebUI pins: never installed, upgraded or downgraded here (dpagg_core works with
# Forge's transformers 4.46.1, diffusers 0.31.0, numpy 1.26.2 and Pillow 9.5.0).
PROTECTED = ("torch", "torchvision", "transformers", "diffusers", "numpy", "pillow")
# Installed with --no-deps into the pack's own DEPS folder: (distribution, minimum, import name).
# dp-accounting pins attrs<24 in every release: in the environment pip would downgrade the host's
# attrs, or (with --no-deps) `pip check` would report it. Its other dependencies are in
# requirements.txt (the accountant is tested under attrs 26 in the real-ComfyUI CI).
PACK_LOCAL = (("dp-accounting", "0.4.4", "dp_accounting"),)
# git-ignored; dpagg_core/__init__.py appends it to sys.path when dp_accounting is not importable
DEPS = HERE / "_deps"
# distribution -> import name, where they differ
MODULES = {"attrs": "attr", "dp-accounting": "dp_accounting", "pillow": "PIL"}


def requirements(path: Path = HERE / "requirements.txt") -> list[tuple[str, str, str]]:
    """(distribution, minimum version, pip spec) of ``requirements.txt`` (the pack's one list of
    dependencies), without the protected packages."""
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9_.\-]+)\s*(?:>=\s*([0-9][^,;\s]*))?", line)
        if not m:
            continue
        dist = m.group(1).lower()
        if dist in PROTECTED:
            continue
        out.append((dist, m.group(2) or "0", line))
    return out


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _version_in(folder: Path, dist: str) -> str | None:
    """The version of ``dist`` installed in ``folder`` by ``pip install --target``, if any."""
    for found in importlib.metadata.distributions(name=dist, path=[str(folder)]):
        return found.version
    return None


def missing() -> list[tuple[str, tuple[str, ...]]]:
    """(pip spec, extra pip options) of every requirement that is absent or too old."""
    todo = []
    for dist, minimum, spec in requirements():
        version = _installed_version(dist)
        module = MODULES.get(dist, dist.replace("-", "_"))
        if version is None and importlib.util.find_spec(module) is None:
            todo.append((spec, ()))
        elif version is not None and _version_tuple(version) < _version_tuple(minimum):
            todo.append((spec, ()))
    for dist, minimum, module in PACK_LOCAL:
        version = _installed_version(dist)
        if version is None and importlib.util.find_spec(module) is None:
            # Not in the environment: the pack's own copy, (re)installed when absent or too old.
            local = _version_in(DEPS, dist)
            if local is None or _version_tuple(local) < _version_tuple(minimum):
                target = ("--no-deps", "--upgrade", "--target", str(DEPS))
                todo.append((f"{dist}>={minimum}", target))
        elif version is not None and _version_tuple(version) < _version_tuple(minimum):
            # The host's own copy is too old (and would shadow _deps): upgraded where it is.
            todo.append((f"{dist}>={minimum}", ("--no-deps",)))
    # Inside ComfyUI (custom_nodes/<pack>) dpagg_core reads ComfyUI's own tokenizer files;
    # clip-anytorch there would leave `pip check` complaining (it requires ftfy).
    in_comfyui = (HERE.parent.parent / "comfy" / "sd1_tokenizer" / "vocab.json").is_file()
    providers = any(importlib.util.find_spec(m) is not None for m in CLIP_VOCAB_PROVIDERS)
    if not providers and not in_comfyui:
        todo.append(CLIP_VOCAB_SPEC)
    return todo


def constraints_file() -> str:
    """A pip constraints file pinning the protected packages at their installed versions."""
    lines = []
    for dist in PROTECTED:
        version = _installed_version(dist)
        if version is not None:
            lines.append(f"{dist}=={version}")
    fd, path = tempfile.mkstemp(prefix="dpagg-constraints-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(sorted(set(lines))) + "\n")
    return path


def install(spec: str, extra: tuple[str, ...], constraints: str) -> None:
    """``pip install spec *extra --constraint constraints`` (``extra``: e.g. ``--target DEPS``)."""
    try:
        import launch  # the WebUI's launcher module (on PYTHONPATH when the WebUI runs us)
    except ImportError:
        launch = None
    if launch is not None:
        # run_pip passes one command line to the shell: quote every value (paths may have spaces;
        # double quotes work in sh and in cmd.exe).
        words = [spec, *extra, "--constraint", constraints]
        args = "install " + " ".join(w if w.startswith("-") else f'"{w}"' for w in words)
        launch.run_pip(args, f"dpagg requirement: {spec}")
        return
    cmd = [sys.executable, "-m", "pip", "install", spec, *extra, "--constraint", constraints]
    subprocess.run(cmd, check=True)


def main() -> int:
    todo = missing()
    if not todo:
        return 0
    constraints = constraints_file()
    try:
        for spec, extra in todo:
            install(spec, extra, constraints)
    finally:
        os.unlink(constraints)
    return 0


if __name__ == "__main__":
    sys.exit(main())
