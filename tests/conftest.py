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
