"""``dpagg run --method dpsgd`` and the ledger's charge/complete (docs/privacy.md invariant 5).

DP-SGD draws noise in every one of its T steps, so its spend is committed by ``Ledger.reserve``
before the first draw and the result stored by ``Reservation.complete`` afterwards. These tests run
the real CLI on a tiny SD-structured diffusers folder (32 px, 2 steps) and the real SQLite ledger.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_pipeline

from dpagg_core.cli import main
from dpagg_core.errors import BudgetExceeded, DpaggError
from dpagg_core.io.released_file import read_released
from dpagg_core.privacy import accountant
from dpagg_core.privacy.composition import charged_blocks, composed_spend
from dpagg_core.privacy.ledger import Ledger
from dpagg_core.privacy.request_keys import training_request
from dpagg_core.training import dpsgd
from dpagg_core.training.dpsgd import calibrate_dpsgd

N_IMAGES, STEPS, BATCH = 4, 2, 2.0
DELTA = 1e-2


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    tiny_pipeline(hidden_size=32, seed=0).save_pretrained(folder)
    return folder


def make_images(folder: Path, count: int = N_IMAGES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (40, 48), (40 * i, 200 - 30 * i, 90)).save(folder / f"img{i}.png")
    return folder


def argv(tmp_path: Path, model: Path, name: str, *extra: str) -> list[str]:
    return [
        "run",
        "--method",
        "dpsgd",
        "--images",
        str(tmp_path / "private"),
        "--model",
        str(model),
        "--steps",
        str(STEPS),
        "--resolution",
        "32",
        "--epsilon",
        "2",
        "--delta",
        str(DELTA),
        "--expected-batch",
        str(BATCH),
        "--grad-clip-norm",
        "0.01",
        "--vectors",
        "2",
        "--name",
        name,
        "--out-dir",
        str(tmp_path / "embeddings"),
        "--ledger",
        str(tmp_path / "ledger.sqlite"),
        *extra,
    ]


def run_json(capsys, args: list[str]) -> dict:
    code = main([*args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def fail_if_trained(*_a, **_k):
    raise AssertionError("DP-SGD must not train here")


def plan_of_run() -> accountant.PrivacyPlan:
    return calibrate_dpsgd(2.0, DELTA, n=N_IMAGES, q=BATCH / N_IMAGES, steps=STEPS)


def test_dpsgd_run_releases_reuses_and_refuses_over_budget(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    make_images(tmp_path / "private")
    out = tmp_path / "embeddings"
    res = run_json(capsys, argv(tmp_path, tiny_model_dir, "sgd"))
    assert res["prompt"] == "embedding:sgd" and not res["reused"]

    # The file: the DP-SGD result with its privacy record, nothing private.
    file = out / "sgd.safetensors"
    tensors, record = read_released(file)
    assert tuple(tensors["emb_params"].shape) == (2, 32)
    assert record["mechanism"] == dpsgd.METHOD and record["sampling"] == "poisson"
    assert record["steps"] == str(STEPS) and record["releases"] == str(STEPS)
    assert float(record["q"]) == BATCH / N_IMAGES and record["n"] == str(N_IMAGES)
    assert float(record["epsilon"]) <= 2.0 and record["clip_norm"] == repr(0.01)
    assert str(tmp_path) not in file.read_bytes().decode("latin-1")

    # The ledger: one complete 'dpsgd' row holding exactly the released vector, charged T steps.
    led = Ledger(tmp_path / "ledger.sqlite")
    (row,) = led.list_releases()
    assert row["mode"] == "dpsgd" and row["complete"] and row["plan"]["releases"] == STEPS
    assert row["epsilon"] == float(record["epsilon"])
    stored = led.get_release(row["id"])["vector"]
    assert np.array_equal(stored, tensors["emb_params"].double().reshape(-1).numpy())
    status = led.status(row["dataset_id"])
    assert status["spent"]["epsilon"] == row["epsilon"] and status["incomplete"] == 0
    assert res["budget"]["spent_epsilon"] == row["epsilon"]

    # The identical request again: the stored release, no training, nothing spent; a deleted
    # file is written again from the ledger.
    real_train = dpsgd.train_dpsgd
    monkeypatch.setattr(dpsgd, "train_dpsgd", fail_if_trained)
    file.unlink()
    again = run_json(capsys, argv(tmp_path, tiny_model_dir, "sgd"))
    assert again["reused"] and again["release_id"] == row["id"]
    tensors2, record2 = read_released(file)
    assert torch.equal(tensors2["emb_params"], tensors["emb_params"]) and record2 == record
    assert led.status(row["dataset_id"]) == status

    # A new request over the budget (set by the first run to its own epsilon): refused before
    # any training (train_dpsgd fails the test if called), nothing written or spent.
    assert main(argv(tmp_path, tiny_model_dir, "sgd2")) == 2
    assert "budget" in capsys.readouterr().err
    assert not (out / "sgd2.safetensors").exists()
    assert led.status(row["dataset_id"]) == status

    # An existing name is refused before anything is spent (dpagg never overwrites).
    monkeypatch.setattr(dpsgd, "train_dpsgd", real_train)  # (not undo(): it resets the env too)
    (out / "taken.safetensors").write_bytes(b"")
    status = led.set_budget(row["dataset_id"], 9.0, DELTA)
    assert main(argv(tmp_path, tiny_model_dir, "taken")) == 2
    assert "already exists" in capsys.readouterr().err
    assert led.status(row["dataset_id"]) == status


def test_failure_after_charge_stays_spent_and_rerun_charges_again(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    make_images(tmp_path / "private")
    extra = ["--budget-epsilon", "10"]
    calls: list[int] = []

    def boom(*_a, **_k):  # inside the training loop, i.e. after before_noise charged the run
        calls.append(1)
        raise RuntimeError("simulated crash during DP-SGD")

    real_clipped_sum = dpsgd._clipped_sum
    monkeypatch.setattr(dpsgd, "_clipped_sum", boom)
    assert main(argv(tmp_path, tiny_model_dir, "crash", *extra)) == 2
    err = capsys.readouterr().err
    assert calls == [1] and "charged" in err and "simulated crash" in err
    assert not (tmp_path / "embeddings" / "crash.safetensors").exists()

    led = Ledger(tmp_path / "ledger.sqlite")
    (row,) = led.list_releases()
    assert not row["complete"] and row["record"] is None
    assert led.get_release(row["id"])["vector"] is None
    status = led.status(row["dataset_id"])
    plan = plan_of_run()
    assert status["incomplete"] == 1 and status["spent"]["epsilon"] == pytest.approx(
        plan.epsilon, rel=1e-12
    )

    # The identical request is not answered from the incomplete row: it trains and is charged
    # again (attempt 2), then completes.
    monkeypatch.setattr(dpsgd, "_clipped_sum", real_clipped_sum)
    res = run_json(capsys, argv(tmp_path, tiny_model_dir, "crash", *extra))
    assert not res["reused"] and Path(res["file"]).exists()
    first, second = led.list_releases()
    assert second["request_key"] == first["request_key"] + "#2" and second["complete"]
    after = led.status(row["dataset_id"])
    assert after["releases"] == 2 and after["incomplete"] == 1
    # Two DP-SGD runs cost two T-step blocks: the 2T-step composition (PLD, by the accountant
    # directly), far above one run's epsilon.
    two_runs = accountant.epsilon_for(
        plan.noise_multiplier, DELTA, N_IMAGES, "poisson", q=plan.q, releases=2 * STEPS
    ).epsilon
    assert after["spent"]["epsilon"] == pytest.approx(two_runs, rel=1e-2)
    assert after["spent"]["epsilon"] > 1.3 * plan.epsilon


def test_two_identical_reservations_cost_two_blocks_and_check_request_is_a_dry_run(tmp_path):
    plan = plan_of_run()
    led = Ledger(tmp_path / "ledger.sqlite")
    kw = {
        "dataset_id": "ds",
        "plan": plan,
        "name": "x",
        "clip_norm": 0.01,
        "budget_epsilon": 1.5 * plan.epsilon,
    }
    run = {"config": {"steps": STEPS}}
    # The trap: counted as one call per row, two runs of a T-step plan fit one block (free).
    assert composed_spend([plan, plan], DELTA).epsilon == plan.epsilon
    assert len(charged_blocks([plan] * (2 * STEPS))) == 2

    dry = led.check_request(training_request(run, **kw))
    assert dry.release_id == 0 and not dry.reused and led.list_releases() == []
    with pytest.raises(DpaggError, match="reserves nothing"):
        dry.complete(np.zeros(7), {"a": "b"})
    first = led.reserve(training_request(run, **kw))
    assert first.release_id == 1 and first.attempt == 1
    assert first.state.spent_epsilon == plan.epsilon
    with pytest.raises(BudgetExceeded, match="nothing was spent"):
        led.check_request(training_request(run, **kw))
    with pytest.raises(BudgetExceeded):
        led.reserve(training_request(run, **kw))  # a second run costs a second block
    assert len(led.list_releases()) == 1

    led.set_budget("ds", 2.5 * plan.epsilon, DELTA)
    del kw["budget_epsilon"]  # it capped this request at 1.5 x; the stored budget applies now
    second = led.reserve(training_request(run, **kw))
    assert second.attempt == 2 and second.state.spent_epsilon > 1.3 * plan.epsilon
    assert led.status("ds")["spent"]["epsilon"] == second.state.spent_epsilon

    # complete: once per reservation, finite vectors, string records; reuse returns it bit-exact.
    vec = np.random.default_rng(0).normal(size=7)
    with pytest.raises(DpaggError, match="NaN"):
        second.complete(np.full(7, np.nan), {"a": "b"})
    done = second.complete(vec, {"epsilon": "1"})
    assert done.spent_epsilon == second.state.spent_epsilon
    with pytest.raises(DpaggError, match="already completed"):
        second.complete(vec, {"epsilon": "1"})
    reused = led.reserve(training_request(run, **kw))
    assert reused.reused and reused.release_id == second.release_id
    published = vec.astype(np.float32).astype(np.float64)  # stored at the published precision
    assert np.array_equal(reused.result.release.vector, published)
    assert reused.result.release.record == {"epsilon": "1"}
    assert led.status("ds")["spent"]["epsilon"] == second.state.spent_epsilon  # nothing spent
    rows = led.list_releases(with_vectors=True)
    assert [r["complete"] for r in rows] == [False, True] and rows[0]["vector"] is None


def test_dpagg_only_options_are_refused_before_loading(tmp_path, capsys, monkeypatch):
    make_images(tmp_path / "private")
    monkeypatch.setattr(dpsgd, "train_dpsgd", fail_if_trained)
    missing_model = tmp_path / "no-model-here"
    assert main(argv(tmp_path, missing_model, "x", "--clip-norm", "1")) == 2
    assert "--grad-clip-norm" in capsys.readouterr().err
    assert main(argv(tmp_path, missing_model, "x", "--sampling", "wor", "--m", "2")) == 2
    assert "--sampling" in capsys.readouterr().err
    assert not (tmp_path / "ledger.sqlite").exists()


def test_a_changed_dpsgd_request_trains_and_spends_an_identical_one_does_not(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    """The request key (``request_keys.training_request`` over the image set, the model
    fingerprint, the DP-SGD config with its seed, the plan and the name) decides: the identical
    request is answered from the record without calling the trainer; the same command with
    another seed is a new release, trained and charged."""
    make_images(tmp_path / "private")
    file = tmp_path / "embeddings" / "sgd.safetensors"
    trained: list[int] = []
    real_train = dpsgd.train_dpsgd

    def counting(*a, **k):
        trained.append(1)
        return real_train(*a, **k)

    monkeypatch.setattr(dpsgd, "train_dpsgd", counting)
    extra = ["--budget-epsilon", "10"]
    first = run_json(capsys, argv(tmp_path, tiny_model_dir, "sgd", *extra))
    assert trained == [1] and not first["reused"]
    led = Ledger(tmp_path / "ledger.sqlite")
    (row,) = led.list_releases()
    spent = led.status(row["dataset_id"])

    monkeypatch.setattr(dpsgd, "train_dpsgd", fail_if_trained)
    file.unlink()  # the name is free again: only the ledger's record can answer
    again = run_json(capsys, argv(tmp_path, tiny_model_dir, "sgd", *extra))
    assert again["reused"] and again["release_id"] == row["id"]
    assert led.status(row["dataset_id"]) == spent and len(led.list_releases()) == 1

    monkeypatch.setattr(dpsgd, "train_dpsgd", counting)
    file.unlink()
    seeded = run_json(capsys, argv(tmp_path, tiny_model_dir, "sgd", *extra, "--seed", "1"))
    assert trained == [1, 1] and not seeded["reused"] and seeded["release_id"] != row["id"]
    after = led.status(row["dataset_id"])
    assert after["releases"] == 2 and after["spent"]["epsilon"] > spent["spent"]["epsilon"]


def test_the_dpsgd_request_key_follows_every_input():
    """``request_of`` + ``training_request``: equal inputs give equal keys; the image set, the
    seed, another config value, the UNet, the text encoder alone (not in ``base_model_id``), the
    plan, the name and a basis each give a new one."""
    from types import SimpleNamespace

    from dpagg_core.training.dpsgd import DPSGDConfig
    from dpagg_core.training.dpsgd_run import request_of

    def model(seed: int = 0):
        return SimpleNamespace(
            pipe=tiny_pipeline(hidden_size=32, seed=seed), family="sd1", prediction_type="epsilon"
        )

    base_model, base_config, plan = model(), DPSGDConfig(), plan_of_run()

    def key(m=base_model, config=base_config, dataset="ds", p=plan, name="x", basis=None):
        request = request_of(config, m) | ({"basis_sha256": basis} if basis else {})
        return training_request(
            request, dataset_id=dataset, plan=p, name=name, clip_norm=config.clip_norm
        ).digest

    reference = key()
    assert key(m=model()) == reference  # the same weights, loaded again
    text_encoder_only = model()
    with torch.no_grad():
        for param_name, param in text_encoder_only.pipe.text_encoder.named_parameters():
            if "embeddings" not in param_name:
                param.add_(0.5)
    changed = [
        key(dataset="other"),
        key(config=DPSGDConfig(seed=1)),
        key(config=DPSGDConfig(steps=3)),
        key(m=model(seed=1)),
        key(m=text_encoder_only),
        key(p=calibrate_dpsgd(1.0, DELTA, n=N_IMAGES, q=BATCH / N_IMAGES, steps=STEPS)),
        key(name="y"),
        key(basis="0" * 64),
    ]
    assert reference not in changed and len(set(changed)) == len(changed)
