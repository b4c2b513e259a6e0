"""``dpagg run`` and ``train`` end to end on a tiny SD-structured model (a diffusers folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from tiny_models import tiny_pipeline

from dpagg_core.cli import main
from dpagg_core.io.private_file import load_private
from dpagg_core.io.released_file import read_released
from dpagg_core.privacy.ledger import Ledger
from dpagg_core.training import ti


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    tiny_pipeline(hidden_size=32, seed=0).save_pretrained(folder)
    return folder


def make_images(folder: Path, count: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (40, 48), (40 * i, 200 - 30 * i, 90)).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("captions are ignored")
    return folder


def test_run_trains_releases_previews_and_refuses_over_budget_before_training(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    images = make_images(tmp_path / "private")
    out = tmp_path / "embeddings"
    ledger = tmp_path / "ledger.sqlite"
    argv = [
        "run",
        "--images",
        str(images),
        "--model",
        str(tiny_model_dir),
        "--steps",
        "2",
        "--resolution",
        "32",
        "--epsilon",
        "1",
        "--delta",
        "1e-2",
        "--clip-norm",
        "0.5",
        "--name",
        "tiny",
        "--out-dir",
        str(out),
        "--ledger",
        str(ledger),
        "--vectors",
        "2",
    ]
    assert main(argv) == 2  # issue 20 item 10: no budget chosen for a first release
    assert "--budget-epsilon E" in capsys.readouterr().err and not out.exists()
    argv += ["--budget-epsilon", "1"]
    assert main([*argv, "--preview", "--json"]) == 0
    stdout = capsys.readouterr().out
    payload = json.loads(stdout[: stdout.rindex("}") + 1])
    tensors, record = read_released(out / "tiny.safetensors")
    assert tuple(tensors["emb_params"].shape) == (2, 32)
    assert record["n"] == "4" and record["centre"] == "initializer"
    assert payload["prompt"] == "embedding:tiny"
    assert (out / "tiny_preview.png").exists()
    assert str(images) not in (out / "tiny.safetensors").read_bytes().decode("latin-1")

    def no_training(*_a, **_k):
        raise AssertionError("an over-budget request must be refused before training")

    monkeypatch.setattr(ti, "train_embeddings", no_training)
    again = [*argv]
    again[again.index("tiny")] = "tiny2"
    assert main(again) == 2
    assert "budget" in capsys.readouterr().err
    assert not (out / "tiny2.safetensors").exists()


def test_train_keeps_private_embeddings_only_where_asked(tmp_path, tiny_model_dir, capsys):
    images = make_images(tmp_path / "private", 3)
    target = tmp_path / "vault" / "per_image.safetensors"
    argv = [
        "train",
        "--images",
        str(images),
        "--model",
        str(tiny_model_dir),
        "--steps",
        "1",
        "--resolution",
        "32",
        "--keep-private-embeddings",
        str(target),
    ]
    assert main(argv) == 0
    eset = load_private(target, key=Ledger().identity_key())  # the default ledger (conftest)
    assert eset.n == 3 and eset.kind == "textual_inversion" and eset.centre is not None
    bad = [*argv[:-1], str(tmp_path / "models" / "embeddings" / "x.safetensors")]
    assert main(bad) == 2
    assert "embeddings" in capsys.readouterr().err


def test_run_rejects_a_single_image_with_a_clear_error(tmp_path, tiny_model_dir, capsys):
    images = make_images(tmp_path / "one", 1)
    argv = [
        "run",
        "--images",
        str(images),
        "--model",
        str(tiny_model_dir),
        "--epsilon",
        "1",
        "--clip-norm",
        "1",
        "--name",
        "x",
        "--out-dir",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    assert "image" in capsys.readouterr().err


def test_identical_rerun_is_answered_before_training_even_when_training_is_not_reproducible(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    """Issue 19 item 2: the recorded release is keyed by the request's inputs, not by the trained
    vectors. Training made non-deterministic on purpose (as on a GPU) still re-runs free; the
    re-run never calls the trainer, even after the released file was deleted; a new seed or a
    changed model is a new request."""
    import torch

    images = make_images(tmp_path / "private")
    out, ledger = tmp_path / "embeddings", tmp_path / "ledger.sqlite"
    argv = ["run", "--images", str(images), "--model", str(tiny_model_dir), "--steps", "2",
            "--resolution", "32", "--epsilon", "1", "--delta", "1e-2", "--clip-norm", "0.5",
            "--name", "nd", "--out-dir", str(out), "--ledger", str(ledger),
            "--budget-epsilon", "1.5", "--json"]  # fmt: skip
    real = ti.train_vectors
    calls: list[int] = []

    def noisy(*args, **kwargs):  # non-deterministic training: different bits every run
        calls.append(1)
        vectors, centre = real(*args, **kwargs)
        return {k: v + 1e-3 * torch.randn_like(v) for k, v in vectors.items()}, centre

    monkeypatch.setattr(ti, "train_vectors", noisy)
    assert main(argv) == 0 and len(calls) == 1
    first = json.loads(capsys.readouterr().out)
    (out / "nd.safetensors").unlink()  # the user lost the file
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert len(calls) == 1, "the identical re-run must not train"
    assert again["reused"] and again["release_id"] == first["release_id"]
    assert (out / "nd.safetensors").exists()
    assert len(Ledger(ledger).list_releases()) == 1  # nothing spent again
    # A new seed is a deliberately new release: under the same name it is refused (the file
    # exists), under a new name it is charged - here over budget (1 + 1 > 1.5), so refused
    # before training.
    assert main([*argv, "--seed", "7"]) == 2
    assert "already exists" in capsys.readouterr().err and len(calls) == 1
    renamed = [*argv, "--seed", "7"]
    renamed[renamed.index("nd")] = "nd-seed7"
    assert main(renamed) == 2
    assert "would be exceeded" in capsys.readouterr().err and len(calls) == 1
