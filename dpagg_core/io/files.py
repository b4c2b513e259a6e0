"""Atomic, never-overwriting file writes (released embeddings, private sets, public bases), the
one safetensors read they share, and the fingerprint of a folder's listing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors import safe_open

from dpagg_core.errors import DpaggError
from dpagg_core.io.names import name_ok, next_free_name
from dpagg_core.paths import resolve_path

_TMP_SUFFIX = ".dpagg-tmp"


def _current_umask() -> int:
    """The process umask, read without changing it where possible (/proc on Linux; elsewhere
    the set-and-restore idiom)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def output_folder(out_dir: str | os.PathLike[str], what: str = "output folder") -> Path:
    """``out_dir`` resolved (``paths.resolve_path``), checked BEFORE anything is spent: not a
    file, not inside a file, and its nearest existing folder writable (it may not exist yet)."""
    out = resolve_path(out_dir)
    if out.exists() and not out.is_dir():
        raise DpaggError(f"{what} {out} is a file; pass a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise DpaggError(f"{what} {out} is inside a file ({probe}); pass a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DpaggError(f"{what} {out} is not writable; pass a folder you can write")
    return out


def write_new_file(path: Path, data: bytes, *, public: bool = False) -> None:
    """Write ``data`` to ``path`` atomically; fail with DpaggError if ``path`` exists.

    The file is readable by its owner only (0600, the temp file's mode) unless ``public``:
    released embeddings are public by design and get the usual mode (0666 minus the umask),
    like any file the user's tools write; per-image (private) files stay 0600.

    The bytes go to a hidden temp file in the same folder (never ``*.safetensors``/``*.pt``, so
    no loader picks it up), are fsynced, then hard-linked to ``path`` (which fails if ``path``
    exists: no overwrite even in a race) or, where hard links are unsupported, moved with
    ``os.replace`` after an existence check. A crash leaves either no file or the whole file.
    """
    folder = path.parent
    if path.exists() or path.is_symlink():
        raise _exists_error(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem[:40]}.", suffix=_TMP_SUFFIX, dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if public:
                os.fchmod(fh.fileno(), 0o666 & ~_current_umask())
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise _exists_error(path) from None
        except OSError:
            # No hard links here (e.g. FAT, some network shares): check, then rename.
            if path.exists():
                raise _exists_error(path) from None
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file; DpaggError if it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
    except Exception as exc:
        raise DpaggError(f"{path} is not a readable safetensors file ({exc})") from exc
    return tensors, meta


def _exists_error(path: Path) -> DpaggError:
    return DpaggError(
        f"{path} already exists and dpagg never overwrites a file; choose a new name "
        f"(e.g. {next_free_name(path.parent, path.stem) if name_ok(path.stem) else 'another'!r})"
    )


def folder_fingerprint(folder: str | os.PathLike[str], key: str = "") -> str:
    """A digest of a folder's listing (each entry's name, size and mtime) and ``key``: it changes
    when a file is added, removed, renamed or rewritten, so a front end can cache what it read
    from the folder (ComfyUI's ``fingerprint_inputs``, the WebUI's scan cache). Raises OSError
    when the folder cannot be listed."""
    h = hashlib.sha256(key.encode())
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        st = entry.stat()
        h.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()
