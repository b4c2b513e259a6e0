"""Shared fixtures: every test runs with its own dpagg data dir and ledger (never the user's)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_dpagg_state(tmp_path_factory, monkeypatch):
    data = tmp_path_factory.mktemp("dpagg_data")
    monkeypatch.setenv("DPAGG_DATA_DIR", str(data))
    monkeypatch.setenv("DPAGG_LEDGER", str(data / "ledger.sqlite"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's model tests: the CI/dev machines are small and shared,
    and one thread is faster than two fighting. Modules opt in with ``usefixtures``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# The ComfyUI node pack's fixtures (tests/test_nodes_*.py), implemented in tests/nodes_fixtures.py
# (imported only when a test asks for one, so other tests never load the ComfyUI stub).


@pytest.fixture(scope="module")
def pack():
    """The pack's ``nodes`` package and its node modules imported against ``tests/comfy_stub``;
    removed again afterwards so no other test module sees a fake ``comfy_api``."""
    from nodes_fixtures import pack_modules

    yield from pack_modules()


@pytest.fixture
def comfy_base(pack, tmp_path, monkeypatch):
    """A ComfyUI-like folder (models/embeddings, user, output); the ledger in its user/."""
    from nodes_fixtures import comfy_base_folder

    return comfy_base_folder(pack, tmp_path, monkeypatch)


@pytest.fixture
def tiny_backend(pack, monkeypatch):
    """Per-Image TI on a tiny diffusers backend; the list of backend calls."""
    from nodes_fixtures import use_tiny_backend

    return use_tiny_backend(pack, monkeypatch)


@pytest.fixture
def private_folder(comfy_base):
    """ComfyUI/input/mine: three pictures of different sizes and aspect ratios."""
    from nodes_fixtures import write_private_folder

    return write_private_folder(comfy_base)


@pytest.fixture
def fake_checkpoint(pack, monkeypatch):
    """The Public Basis node's token-table seam with a fake checkpoint; the list of calls."""
    from nodes_fixtures import use_fake_checkpoint

    return use_fake_checkpoint(pack, monkeypatch)


@pytest.fixture
def counted_training(pack, monkeypatch):
    """Per-image training made non-deterministic on purpose, counting calls."""
    from nodes_fixtures import count_training

    return count_training(pack, monkeypatch)
