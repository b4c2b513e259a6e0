"""``dpagg rehearse`` (issue 21 item 1): the release pipeline on PUBLIC images, nothing spent."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_models import tiny_pipeline

from dpagg_core.cli import main
from dpagg_core.errors import DpaggError
from dpagg_core.io.released_file import read_released
from dpagg_core.privacy.ledger import Ledger
from dpagg_core.rehearsal import REHEARSAL_RECORD, pick_public, rehearsal_epsilons

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    tiny_pipeline(hidden_size=32, seed=0).save_pretrained(folder)
    return folder


def make_images(folder: Path, count: int, shade: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        colour = ((37 * i + shade) % 256, (200 - 23 * i) % 256, (90 + shade) % 256)
        Image.new("RGB", (40, 48), colour).save(folder / f"p{i}.png")
    return folder


def argv(public: Path, model: Path, out: Path, ledger: Path, *extra: str) -> list[str]:
    return [
        "rehearse",
        "--public-images",
        str(public),
        "--model",
        str(model),
        "--steps",
        "2",
        "--resolution",
        "32",
        "--n",
        "4",
        "--epsilon",
        "2",
        "--clip-norm",
        "0.5",
        "--out-dir",
        str(out),
        "--ledger",
        str(ledger),
        "--preview-steps",
        "2",
        *extra,
    ]


def ledger_rows(path: Path) -> int:
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        return db.execute("select count(*) from releases").fetchone()[0]


def test_rehearsal_shows_three_epsilons_and_spends_nothing(tmp_path, tiny_model_dir, capsys):
    public = make_images(tmp_path / "public", 6)
    out, ledger = tmp_path / "rehearsal", tmp_path / "ledger.sqlite"
    assert main([*argv(public, tiny_model_dir, out, ledger), "--draws", "2", "--json"]) == 0
    stdout = capsys.readouterr().out
    payload = json.loads(stdout[stdout.index("{") : stdout.rindex("}") + 1])
    eps = [r["epsilon"] for r in payload["releases"]]
    assert eps == pytest.approx(rehearsal_epsilons(2.0), rel=1e-3)
    assert payload["n"] == 4 and payload["available"] == 6
    assert payload["forecast"]["rho_source"] == "measured on this public folder"
    assert payload["forecast"]["k"] == 32  # full space: 1 vector x 32 values (tiny model)
    # more epsilon, less noise: every release is noisier than half its epsilon's noise
    z = [r["noise_multiplier"] for r in payload["releases"]]
    assert z[0] > z[1] > z[2]
    for release in payload["releases"]:
        assert len(release["files"]) == 2 and len(release["relative_error"]) == 2
        tensors, record = read_released(Path(release["files"][0]))
        assert record["rehearsal"] == REHEARSAL_RECORD and tensors["emb_params"].shape == (1, 32)
    grid = Image.open(payload["grid"])
    assert grid.width >= 5 * 32 and grid.height > 2 * 32  # 5 columns, 2 draw rows
    # nothing recorded: no release, no picture registered as private
    assert ledger_rows(ledger) == 0
    assert Ledger(ledger).list_releases() == []


def test_rehearsal_refuses_pictures_recorded_as_private(tmp_path, tiny_model_dir, capsys):
    private = make_images(tmp_path / "private", 4, shade=50)
    ledger = tmp_path / "ledger.sqlite"
    from dpagg_core.io.images import load_image_folder

    load_image_folder(private, resolution=32, ledger=ledger)  # registers them as private
    mixed = make_images(tmp_path / "public", 5)
    for p in sorted(private.iterdir())[:1]:
        (mixed / f"copy_{p.name}").write_bytes(p.read_bytes())
    out = tmp_path / "rehearsal"
    code = main(argv(mixed, tiny_model_dir, out, ledger))
    err = capsys.readouterr().err
    assert code != 0 and "private" in err.lower() and "copy_p0.png" in err
    assert not out.exists() or not any(out.rglob("*.safetensors"))


def test_a_rehearsal_needs_enough_public_pictures():
    assert pick_public(10, 4, seed=0) == pick_public(10, 4, seed=0)
    assert len(set(pick_public(10, 10, seed=1))) == 10
    with pytest.raises(DpaggError, match="holds 3 images"):
        pick_public(3, 4, seed=0)
    with pytest.raises(DpaggError, match="at least 2"):
        pick_public(3, 1, seed=0)


def test_relative_error_shrinks_with_epsilon_on_average(tmp_path, tiny_model_dir, capsys):
    """With 4 draws per epsilon, the mean distance from the non-private mean at epsilon 8 is
    below the one at epsilon 0.5 (noise std ratio > 10; a reversal would need a > 3-sigma
    event for every draw)."""
    public = make_images(tmp_path / "public", 4)
    out, ledger = tmp_path / "rehearsal", tmp_path / "ledger.sqlite"
    args = argv(public, tiny_model_dir, out, ledger, "--draws", "4", "--no-grid", "--json")
    i = args.index("--epsilon")
    low = [*args[:i], "--epsilon", "0.5", *args[i + 2 :], "--name", "low"]
    high = [*args[:i], "--epsilon", "8", *args[i + 2 :], "--name", "high"]
    assert main(low) == 0
    low_out = capsys.readouterr().out
    assert main(high) == 0
    high_out = capsys.readouterr().out

    def errors(text: str) -> float:
        payload = json.loads(text[text.index("{") : text.rindex("}") + 1])
        assert payload["grid"] is None
        return float(np.mean(payload["releases"][1]["relative_error"]))

    assert errors(high_out) < errors(low_out)
