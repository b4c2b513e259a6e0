"""``dpagg account``, ``aggregate``, ``train`` and ``run`` (``--method ti|clip|dpsgd``)."""

from __future__ import annotations

import argparse
import math
from typing import Any

from dpagg_core.cli.common import (
    emit,
    ledger_of,
    log,
    plan_of,
    release_options,
    report_release,
    require_budget,
    require_clip_norm,
    trainer_of,
)
from dpagg_core.errors import DpaggError


def cmd_account(args: argparse.Namespace) -> int:
    from dpagg_core.privacy.forecast import forecast
    from dpagg_core.privacy.noise_comparison import noise_comparison
    from dpagg_core.privacy.plan_text import DELTA_MEANING, delta_warning, plan_summary

    if args.n is None:
        raise DpaggError("--n is required: the number of private images (public under replace-one)")
    plan = plan_of(args, args.n)
    warning = delta_warning(plan.delta, args.n) if args.delta is not None else None
    comparison, block = (
        noise_comparison(plan, k=args.k, dim=args.dim)
        if math.isfinite(plan.epsilon) and plan.epsilon > 0
        else (None, "(no noise comparison: the plan's epsilon is not finite)")
    )
    outlook = forecast(plan, k=args.k or args.dim, rho=args.rho)
    payload = {
        "plan": plan.to_dict(),
        "delta_meaning": DELTA_MEANING,
        "delta_warning": warning,
        "comparison": comparison,
        "forecast": outlook.to_dict(),
    }
    emit(
        args,
        payload,
        f"{plan_summary(plan)}\n{outlook.text()}\n\n{block}\n\n{DELTA_MEANING}",
    )
    return 0


def _release_and_report(args: argparse.Namespace, eset, plan) -> int:
    """Release ``eset`` (a private per-image file) with the CLI's release flags and print it."""
    from dpagg_core.aggregate.release import release_embeddings

    require_clip_norm(args)
    basis = None
    if getattr(args, "basis", None) is not None:
        from dpagg_core.aggregate.basis_builders import load_basis

        basis = load_basis(args.basis)
    outcome = release_embeddings(
        eset, plan=plan, ledger=ledger_of(args), **release_options(args, basis)
    )
    report_release(args, outcome)
    return 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    from dpagg_core.io.private_file import load_private

    eset = load_private(args.embeddings, key=ledger_of(args).identity_key())
    plan = plan_of(args, eset.n)
    require_budget(args, eset.dataset_id, plan)
    return _release_and_report(args, eset, plan)


def cmd_train(args: argparse.Namespace) -> int:
    from dpagg_core.training.distributed import is_main_process

    trainer = trainer_of(args)
    eset = trainer.train(trainer.images(args.images))
    if eset is None or not is_main_process():
        return 0
    payload = {
        "n": eset.n,
        "kind": eset.kind,
        "shapes": {k: list(v.shape) for k, v in eset.vectors.items()},
    }
    if args.keep_private_embeddings:
        from dpagg_core.io.private_file import save_private

        path = save_private(eset, args.keep_private_embeddings, key=ledger_of(args).identity_key())
        log.warning(
            "wrote PRIVATE per-image embeddings to %s: each row can leak its image; keep this "
            "file as private as the images and never put it in an embeddings folder",
            path,
        )
        payload["private_file"] = str(path)
    text = f"trained {eset.n} per-image embeddings {payload['shapes']}" + (
        f"; private copy at {payload['private_file']}"
        if "private_file" in payload
        else " (kept in memory only; pass --keep-private-embeddings FILE to keep them)"
    )
    emit(args, payload, text)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """``dpagg run``: the core pipeline (``dpagg_core.pipeline.train_and_release``): an identical
    request is answered from the ledger before any training; otherwise over budget is refused
    before training, then train per image and release."""
    from dpagg_core.pipeline import train_and_release

    if args.method == "dpsgd":
        return _run_dpsgd(args)
    if args.clip_norm is None and args.method == "clip":
        args.clip_norm = 1.0  # L2-normalised CLIP image embeddings around the origin
    require_clip_norm(args)
    trainer = trainer_of(args, args.method)
    loaded = trainer.images(args.images)
    plan = plan_of(args, loaded.count)  # plan errors surface before any training
    require_budget(args, loaded.dataset_id, plan)
    basis = None
    if args.basis is not None:  # a misfit basis: refused before training
        basis = trainer.basis(args.basis) if trainer.backend is not None else None
        if basis is None:
            from dpagg_core.aggregate.basis_builders import load_basis

            basis = load_basis(args.basis)
    outcome = train_and_release(
        trainer,
        loaded,
        plan,
        ledger=ledger_of(args),
        **release_options(args, basis),
    )
    if outcome is None:  # torchrun: rank 0 releases
        return 0
    report_release(args, outcome)
    if args.preview and trainer.model is not None:
        from dpagg_core.showcase.preview import preview_grid

        png = preview_grid(trainer.model, outcome.path, args.name)
        print(f"preview: {png}")
    return 0


def _run_dpsgd(args: argparse.Namespace) -> int:
    """``dpagg run --method dpsgd``: the DP-SGD baseline released through the ledger
    (``dpagg_core.training.dpsgd_run``); DPAgg-only options are refused before anything loads."""
    from dpagg_core.training.dpsgd import DPSGDConfig
    from dpagg_core.training.dpsgd_run import DpsgdRequest, run_dpsgd

    _dpsgd_refuse_dpagg_options(args)
    values: dict[str, Any] = {
        "vectors": args.vectors,
        "initializer": args.initializer,
        "templates": args.templates,
        "resolution": args.resolution,
        "chunk_size": args.batch_size,
        "seed": args.seed,
    }
    for option, field in (
        ("steps", "steps"),
        ("learning_rate", "learning_rate"),
        ("expected_batch", "expected_batch"),
        ("grad_clip_norm", "clip_norm"),
        ("optimizer", "optimizer"),
    ):
        if getattr(args, option, None) is not None:
            values[field] = getattr(args, option)
    config = DPSGDConfig(**values)
    done = run_dpsgd(
        DpsgdRequest(
            images=args.images,
            model=args.model,
            name=args.name,
            out_dir=args.out_dir,
            epsilon=args.epsilon,
            config=config,
            delta=args.delta,
            family=args.family,
            prediction_type=args.prediction_type,
            device=args.device,
            ledger=args.ledger,
            budget_epsilon=args.budget_epsilon,
            budget_delta=args.budget_delta,
            basis=args.basis,
            a1111_pt=args.a1111_pt,
        )
    )
    report_release(args, done.outcome, f"DP-SGD, {config.steps} steps")
    if args.preview:
        from dpagg_core.showcase.preview import preview_grid

        print(f"preview: {preview_grid(done.model, done.outcome.path, done.outcome.name)}")
    return 0


# DPAgg release options that mean nothing for DP-SGD (it sets its own plan, clip and centre).
_DPSGD_REFUSED = (
    ("clip_norm", None, "--clip-norm is DPAgg's embedding clip; use --grad-clip-norm for DP-SGD"),
    ("sampling", "full", "DP-SGD samples Poisson batches itself (q = --expected-batch / n)"),
    ("m", None, "DP-SGD samples Poisson batches itself (q = --expected-batch / n)"),
    ("q", None, "DP-SGD's sampling rate is --expected-batch / n"),
    ("releases", 1, "DP-SGD's plan covers its --steps noisy steps"),
    ("centre", None, "DP-SGD starts at the initializer; --centre is for DPAgg"),
    ("clip_mode", "clip", "DP-SGD clips per-example gradients; --clip-mode is for DPAgg"),
    ("mixed_precision", "no", "DP-SGD trains in full precision; drop --mixed-precision"),
    ("gradient_checkpointing", False, "DP-SGD does not use gradient checkpointing"),
    ("postprocess", "none", "--postprocess is for DPAgg releases"),
    (
        "public_embeddings",
        None,
        "DP-SGD starts at the initializer; --public-embeddings is for DPAgg",
    ),
)


def _dpsgd_refuse_dpagg_options(args: argparse.Namespace) -> None:
    for dest, default, why in _DPSGD_REFUSED:
        if getattr(args, dest, default) != default:
            flag = "--" + dest.replace("_", "-")
            raise DpaggError(f"{flag} does not apply to --method dpsgd: {why}. Drop {flag}.")
    from dpagg_core.training.distributed import world

    if world()[1] > 1:
        raise DpaggError(
            "--method dpsgd runs in one process: launch it without torchrun (WORLD_SIZE > 1)"
        )
