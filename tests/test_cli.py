"""The ``dpagg`` command as a user runs it (in-process ``main`` and one real subprocess)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpagg_core.cli import main
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.io.images import dataset_id_for
from dpagg_core.io.private_file import save_private
from dpagg_core.privacy.ledger import Ledger


def run_json(capsys, *argv: str) -> dict:
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def private_set(tmp_path: Path, n: int = 30) -> Path:
    """A private file authenticated with the key of the ledger the CLI tests use."""
    key = Ledger(tmp_path / "ledger.sqlite").identity_key()
    gen = torch.Generator().manual_seed(1)
    centre = torch.randn(2, 16, generator=gen)
    eset = EmbeddingSet(
        vectors={"emb_params": (centre + 0.1 * torch.randn(n, 2, 16, generator=gen)).float()},
        kind="textual_inversion",
        model_family="sd1",
        base_model_id="cli-test",
        centre={"emb_params": centre.float()},
        initializer="painting",
        dataset_id=dataset_id_for([b"cli"], key=key),
    )
    return save_private(eset, tmp_path / "private" / "set.safetensors", key=key)


def test_account_forward_and_reverse(capsys):
    plan = run_json(capsys, "account", "--epsilon", "1", "--delta", "1e-5", "--n", "100")["plan"]
    assert plan["noise_multiplier"] == pytest.approx(3.7306, rel=1e-3)
    back = run_json(
        capsys,
        "account",
        "--noise-multiplier",
        str(plan["noise_multiplier"]),
        "--delta",
        "1e-5",
        "--n",
        "100",
    )["plan"]
    assert back["epsilon"] == pytest.approx(1.0, rel=1e-3)
    wor = run_json(
        capsys,
        "account",
        "--epsilon",
        "1",
        "--delta",
        "1e-5",
        "--n",
        "100",
        "--sampling",
        "wor",
        "--m",
        "20",
    )["plan"]
    assert wor["sampling"] == "wor" and wor["m"] == 20 and wor["epsilon"] <= 1.0


def test_account_compares_the_papers_noise_the_recommended_plan_and_the_subspace(capsys):
    """One block (and JSON): at the same (epsilon, delta, n) the paper's configuration (wor,
    m = n/10) against dpagg's recommended full plan, both calibrated to that epsilon, and the
    noise norm over D vs K coordinates (ratio sqrt(K/D))."""
    from dpagg_core.privacy.calibration import calibrate

    argv = ["account", "--epsilon", "1", "--n", "50", "--dim", "768", "--k", "8"]
    cmp_ = run_json(capsys, *argv)["comparison"]
    paper, full = calibrate(1.0, 1e-5, 50, "wor", m=5), calibrate(1.0, 1e-5, 50, "full")
    assert cmp_["paper"]["sampling"] == "wor" and cmp_["paper"]["m"] == 5
    assert cmp_["paper"]["noise_std_per_C"] == pytest.approx(paper.noise_std(1.0), rel=1e-9)
    assert cmp_["recommended"]["sampling"] == "full"
    std = full.noise_std(1.0)
    assert cmp_["recommended"]["noise_std_per_C"] == pytest.approx(std, rel=1e-9)
    assert cmp_["paper"]["epsilon"] <= 1.0 and cmp_["recommended"]["epsilon"] <= 1.0
    assert cmp_["paper_noise_ratio"] == pytest.approx(paper.noise_std(1.0) / std)
    assert cmp_["paper_noise_ratio"] > 3  # 2C/m with m = n/10 outweighs the amplification
    sub = cmp_["subspace"]
    assert (sub["K"], sub["D"]) == (8, 768)
    assert sub["noise_norm_ratio"] == pytest.approx(math.sqrt(8 / 768))
    assert sub["noise_norm_per_C"] == pytest.approx(std * math.sqrt(8))
    assert sub["full_noise_norm_per_C"] == pytest.approx(std * math.sqrt(768))
    # the readable block says the same
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "paper (subsample m = 5 of 50, wor):" in text and "<- recommended" in text
    assert "the paper's configuration has 3.37x the noise" in text
    assert "K = 8 noised coordinates" in text and "(x0.10)" in text
    # without --dim/--k: the comparison, no subspace; --k without --dim is refused
    assert (
        run_json(capsys, "account", "--epsilon", "2", "--n", "100")["comparison"]["subspace"]
        is None
    )
    assert main(["account", "--epsilon", "1", "--n", "50", "--k", "8"]) == 2
    assert "--dim" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--epsilon", "1", "--delta", "0.5", "--n", "100"], "delta"),
        (["--epsilon", "-1", "--delta", "1e-5", "--n", "100"], "epsilon"),
        (["--epsilon", "1", "--delta", "1e-5", "--n", "100", "--sampling", "wor"], "m"),
        (["--epsilon", "1", "--delta", "1e-5", "--n", "10", "--sampling", "wor", "--m", "20"], "m"),
    ],
)
def test_account_bad_input_is_a_clear_error(capsys, argv, needle):
    assert main(["account", *argv]) == 2
    err = capsys.readouterr().err
    assert "error" in err and needle in err


def test_aggregate_inspect_ledger_and_refusal(tmp_path, capsys):
    private = private_set(tmp_path)
    ledger = tmp_path / "ledger.sqlite"
    out = tmp_path / "embeddings"
    common = [
        "--delta",
        "1e-3",
        "--clip-norm",
        "0.3",
        "--out-dir",
        str(out),
        "--ledger",
        str(ledger),
    ]
    # issue 20 item 10: the set's first release needs a deliberate budget; nothing spent
    first = ["aggregate", "--embeddings", str(private), "--epsilon", "1", "--name", "s", *common]
    assert main(first) == 2
    assert "--budget-epsilon E: choose the total epsilon" in capsys.readouterr().err
    assert not out.exists() or not list(out.iterdir())
    res = run_json(capsys, *first, "--budget-epsilon", "1")
    assert res["prompt"] == "embedding:s" and Path(res["file"]).exists()
    assert res["budget"]["remaining_epsilon"] == pytest.approx(0.0, abs=1e-6)

    info = run_json(capsys, "inspect", str(out / "s.safetensors"))
    assert json.dumps(info).count("epsilon") >= 1 and str(tmp_path) not in json.dumps(info)

    assert (
        main(["aggregate", "--embeddings", str(private), "--epsilon", "1", "--name", "t", *common])
        == 2
    )
    assert "budget" in capsys.readouterr().err.lower()
    assert not (out / "t.safetensors").exists()

    shown = run_json(capsys, "ledger", "show", "--ledger", str(ledger))
    assert len(shown["releases"]) == 1
    (dataset,) = shown["datasets"]
    run_json(
        capsys,
        "ledger",
        "set-budget",
        "--dataset",
        dataset,
        "--epsilon",
        "3",
        "--delta",
        "1e-2",
        "--ledger",
        str(ledger),
    )
    again = run_json(
        capsys, "aggregate", "--embeddings", str(private), "--epsilon", "1", "--name", "t", *common
    )
    assert not again["reused"] and again["budget"]["epsilon"] == pytest.approx(3.0)


def test_private_set_cannot_be_released_into_prompt_folder_by_accident(tmp_path, capsys):
    # the private file is refused in an embeddings folder; releasing is fine
    with pytest.raises(Exception, match="embeddings"):
        save_private(
            EmbeddingSet(
                vectors={"emb_params": torch.zeros(3, 1, 8)},
                kind="textual_inversion",
                model_family="sd1",
                dataset_id="x",
            ),
            tmp_path / "models" / "embeddings" / "p.safetensors",
            key=bytes(32),
        )


def test_console_script_runs_demo_aggregation_only(tmp_path):
    env = dict(os.environ)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpagg_core.cli",
            "demo",
            "--aggregation-only",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "refused as expected" in proc.stdout
    assert (tmp_path / "embeddings" / "demo_style.safetensors").exists()
    assert not (tmp_path / "embeddings" / "demo_style_again.safetensors").exists()
    # The demo releases with the library's default delta (1e-5), with no delta warning.
    from dpagg_core.io.released_file import read_released
    from dpagg_core.privacy.accountant import DEFAULT_DELTA

    _, record = read_released(tmp_path / "embeddings" / "demo_style.safetensors")
    assert float(record["delta"]) == DEFAULT_DELTA
    assert "fails completely" not in proc.stderr
