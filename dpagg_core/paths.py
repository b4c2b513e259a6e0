"""Where dpagg keeps its own state (the ledger). Overridable for tests and ComfyUI.

Every path a user gives dpagg - ``--ledger``, ``DPAGG_LEDGER``, ``DPAGG_DATA_DIR``, image and
output folders - goes through :func:`resolve_path`, so ``~`` and relative paths mean the same file
in the CLI, the ComfyUI nodes and the Python API (a literal ``~`` must never become a folder named
``~`` in whatever the working directory happens to be).
"""

from __future__ import annotations

import os
import string
from pathlib import Path

from platformdirs import user_data_dir

from dpagg_core.errors import DpaggError

LEDGER_ENV = "DPAGG_LEDGER"
DATA_DIR_ENV = "DPAGG_DATA_DIR"
LEGACY_SALT_NAME = "salt"
LEDGER_NAME = "ledger.sqlite"
HOST_SUBDIR = "dpagg"  # dpagg's folder in a host application's user/data directory


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """``~`` and ``~user`` expanded, environment variables expanded, made absolute (not following
    symlinks, so a moved link target is still reported by the name the user gave)."""
    text = os.path.expandvars(os.fspath(path))
    return Path(os.path.abspath(os.path.expanduser(text)))


def data_dir() -> Path:
    env = os.environ.get(DATA_DIR_ENV)
    return resolve_path(env) if env else Path(user_data_dir("dpagg", appauthor=False))


def _env_ledger() -> Path | None:
    env = os.environ.get(LEDGER_ENV)
    return resolve_path(env) if env else None


def default_ledger_path() -> Path:
    """``--ledger`` wins, then env ``DPAGG_LEDGER``, then ``<user data dir>/ledger.sqlite``."""
    return _env_ledger() or data_dir() / LEDGER_NAME


def host_ledger_path(host_dir: str | os.PathLike[str]) -> Path:
    """The ledger of dpagg inside a host application: ``DPAGG_LEDGER`` if set (read as the CLI
    reads it), else ``<host_dir>/dpagg/ledger.sqlite`` (ComfyUI's user directory, the WebUI's
    data dir)."""
    return _env_ledger() or resolve_path(host_dir) / HOST_SUBDIR / LEDGER_NAME


def legacy_install_salt() -> bytes | None:
    """The per-install salt that dpagg < 0.3 kept in the data dir, or None if there is none.

    Only read when a schema-1 ledger is upgraded: the salt becomes that ledger's identity key
    (``ledger.Ledger.identity_key``), so its recorded datasets keep their ids. An empty, short or
    garbled salt (the old code could expose an empty file to a concurrent reader) is an error,
    never used as a key.
    """
    path = data_dir() / LEGACY_SALT_NAME
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DpaggError(
            f"cannot read the legacy dpagg salt {path} ({exc}); make it readable"
        ) from exc
    if len(text) != 64 or any(c not in string.hexdigits for c in text):
        raise DpaggError(
            f"the legacy dpagg salt {path} is empty or damaged ({len(text)} characters, expected "
            "64 hex digits), so the ledger written with it cannot be upgraded safely. Fix: restore "
            "the file from a backup; if it is lost, the ids of that ledger's datasets cannot be "
            "recomputed: start a new ledger with --ledger or DPAGG_LEDGER."
        )
    return bytes.fromhex(text)
