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
