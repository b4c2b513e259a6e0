"""Where dpagg keeps its own state (ledger, install salt). Overridable for tests and ComfyUI."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from platformdirs import user_data_dir

LEDGER_ENV = "DPAGG_LEDGER"
DATA_DIR_ENV = "DPAGG_DATA_DIR"


def data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or user_data_dir("dpagg", appauthor=False))


def default_ledger_path() -> Path:
    """``--ledger`` wins, then env ``DPAGG_LEDGER``, then ``<user data dir>/ledger.sqlite``."""
    env = os.environ.get(LEDGER_ENV)
    return Path(env) if env else data_dir() / "ledger.sqlite"


def install_salt() -> bytes:
    """A random per-installation salt for dataset ids, so an id reveals nothing about the images.

    Created once (CSPRNG) next to the ledger; never part of a released file.
    """
    path = data_dir() / "salt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "x") as fh:
                fh.write(secrets.token_hex(32))
        except FileExistsError:
            pass
    return bytes.fromhex(path.read_text().strip())
