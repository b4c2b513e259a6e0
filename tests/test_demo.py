"""`dpagg demo` end to end on the shipped mini model (the command `make demo` runs).

Runs the real console entry in a subprocess: per-image TI on the bundled private images, a
release through a fresh ledger, the with/without picture made by diffusers' own
``load_textual_inversion``, and the refused over-budget second release.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import resources

import pytest
from PIL import Image

from dpagg_core.io.released_file import read_released
from dpagg_core.showcase import demo, minimodel


def test_package_ships_the_mini_model_and_the_private_samples():
    root = resources.files("dpagg_core")
    assert (root / "data" / "minimodel.safetensors").is_file()
    assert minimodel.model_file().stat().st_size <= 25e6
    samples = [e for e in (root / "samples").iterdir() if e.name.endswith(".png")]
    assert (root / "samples" / demo.PUBLIC_EMBEDDINGS).is_file()
    assert len(samples) == demo.DEMO_COUNT
    assert all(Image.open(s).size == (32, 32) for s in samples[:5])


def test_model_file_override_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv(minimodel.MODEL_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=minimodel.MODEL_DIR_ENV):
        minimodel.model_file()


@pytest.mark.slow
def test_dpagg_demo_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dpagg_core.cli", "demo", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "refused as expected" in proc.stdout
    # ... refused for its budget (BudgetExceeded), not for any other error that exits with 2
    assert re.search(r"error: privacy budget of .*image set .* would be exceeded", proc.stderr), (
        proc.stderr[-3000:]
    )

    released = tmp_path / "embeddings" / "demo_style.safetensors"
    vectors, record = read_released(released)
    assert tuple(vectors["emb_params"].shape) == (minimodel.TI_VECTORS, 64)
    assert int(record["n"]) == demo.DEMO_COUNT
    assert abs(float(record["epsilon"]) - demo.DEMO_EPSILON) < 1e-6
    assert not (tmp_path / "embeddings" / "demo_style_again.safetensors").exists()
    # The small-set setting: a public basis and the public-mean centre, both from the shipped
    # PUBLIC embeddings of training styles, and C measured in that basis.
    from dpagg_core.aggregate.subspace import load_public_embeddings, public_mean_centre

    public_file = tmp_path / "public" / "public_styles.emb.safetensors"
    _, basis, clip_norm = demo.demo_public(tmp_path / "again")
    assert record["centre"] == "public_mean" and record["basis_k"] == str(demo.DEMO_BASIS_K)
    assert record["centre_sha256"] == public_mean_centre(load_public_embeddings(public_file)).sha256
    assert record["basis_sha256"] == basis.sha256
    assert float(record["clip_norm"]) == pytest.approx(clip_norm, rel=1e-12)

    sheet = Image.open(tmp_path / demo.SHEET_NAME)
    assert sheet.size[0] > 10 * 96 and sheet.size[1] >= 3 * 96  # 3 rows of 10 upscaled images
    # The rows differ: the embedding changed what the model draws (same seeds otherwise).
    rows = [sheet.crop((300, y, sheet.size[0], y + 96)).tobytes() for y in (4, 108, 212)]
    assert rows[1] != rows[2]
