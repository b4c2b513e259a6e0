"""The ``dpagg`` command: account, aggregate, train, run, demo, audit, ledger, inspect.

Every command takes ``--json`` (machine-readable output on stdout). Errors are one line on stderr
naming the offending parameter and the fix, with exit status 2; nothing is spent on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpagg_core import __version__
from dpagg_core.errors import DpaggError

log = logging.getLogger("dpagg")


# ----------------------------------------------------------------------------------------------
# Output helpers
# ----------------------------------------------------------------------------------------------


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    from dpagg_core.report import emit

    emit(payload, text, as_json=args.json)


# ----------------------------------------------------------------------------------------------
# Shared argument groups
# ----------------------------------------------------------------------------------------------


def _add_plan_args(p: argparse.ArgumentParser, *, allow_noise: bool = True) -> None:
    g = p.add_argument_group("privacy plan")
    target = g.add_mutually_exclusive_group(required=True)
    target.add_argument("--epsilon", type=float, help="target epsilon (calibrates the noise)")
    if allow_noise:
        target.add_argument(
            "--noise-multiplier",
            type=float,
            help="noise std / sensitivity of the mean; prints the epsilon it costs",
        )
    g.add_argument(
        "--delta",
        type=float,
        default=None,
        help="delta: the probability the guarantee may fail outright (default 1e-5)",
    )
    g.add_argument("--sampling", choices=("full", "wor", "poisson"), default="full")
    g.add_argument("--m", type=int, help="subsample size for --sampling wor")
    g.add_argument("--q", type=float, help="sampling rate for --sampling poisson")
    g.add_argument("--releases", type=int, default=1, help="releases the plan covers (k)")


def _user_path(text: str) -> Path:
    """Every path argument: ``~`` and environment variables expanded, made absolute - the same
    meaning as ``DPAGG_LEDGER`` / ``DPAGG_DATA_DIR``, the ComfyUI nodes and the library
    (``paths.resolve_path``)."""
    from dpagg_core.paths import resolve_path

    return resolve_path(text)


def _add_ledger_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ledger",
        type=_user_path,
        help="ledger file (default: $DPAGG_LEDGER or the user data dir); its key ids the images",
    )


def _add_release_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("release")
    g.add_argument("--clip-norm", type=float, help="clip norm C (public; see suggest-clip-norm)")
    g.add_argument(
        "--centre",
        choices=("initializer", "origin", "public_mean"),
        default=None,
        help="public centre to clip around; public_mean: the mean embedding of PUBLIC images "
        "(--public-embeddings)",
    )
    g.add_argument(
        "--public-embeddings",
        type=_user_path,
        default=None,
        help="PUBLIC per-image embeddings (`dpagg public-basis --save-public-embeddings`) whose "
        "mean is the centre for --centre public_mean",
    )
    g.add_argument("--clip-mode", choices=("clip", "normalize"), default="clip")
    g.add_argument("--name", required=True, help="embedding name (used as embedding:<name>)")
    g.add_argument(
        "--out-dir", type=_user_path, required=True, help="folder for <name>.safetensors"
    )
    g.add_argument("--budget-epsilon", type=float, help="dataset budget on first release")
    g.add_argument("--budget-delta", type=float, help="dataset delta budget on first release")
    g.add_argument("--a1111-pt", action="store_true", help="also write an A1111 .pt file")
    g.add_argument(
        "--basis",
        type=_user_path,
        default=None,
        help="PUBLIC basis file (`dpagg public-basis`): aggregate and add noise in its k dims",
    )
    g.add_argument(
        "--postprocess",
        choices=("none", "js", "norm", "js+norm"),
        default="none",
        help="free post-processing of the release: James-Stein shrinkage and/or norm rescaling",
    )
    _add_ledger_args(p)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("per-image textual inversion")
    g.add_argument("--images", type=_user_path, required=True, help="folder of private images")
    g.add_argument("--model", type=_user_path, required=True, help="diffusers folder or checkpoint")
    g.add_argument("--family", choices=("sd1", "sd2", "sdxl"), help="override model detection")
    g.add_argument("--prediction-type", choices=("epsilon", "v_prediction"))
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--learning-rate", type=float, default=None)
    g.add_argument("--vectors", type=int, default=1, help="vectors per token (1-8)")
    g.add_argument("--initializer", default="painting", help="one-token initializer (public)")
    g.add_argument("--templates", choices=("style", "object"), default="style")
    g.add_argument("--resolution", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: best)")
    g.add_argument("--seed", type=int, default=0, help="TI randomness only (never the DP noise)")


def _default_delta(delta: float | None) -> float:
    from dpagg_core.privacy.plan import DEFAULT_DELTA

    return DEFAULT_DELTA if delta is None else delta


def _plan(args: argparse.Namespace, n: int, *, warn: bool = True):
    """The plan from the plan flags; a user-chosen --delta above the safe default is warned
    about on stderr (``plan_text.delta_warning``) before anything runs."""
    from dpagg_core.privacy.bounds import epsilon_for
    from dpagg_core.privacy.calibration import calibrate
    from dpagg_core.privacy.plan_text import delta_warning

    delta = _default_delta(args.delta)
    warning = delta_warning(delta, n) if args.delta is not None else None
    if warn and warning:
        log.warning("%s", warning)
    common = {
        "delta": delta,
        "n": n,
        "sampling": args.sampling,
        "m": args.m,
        "q": args.q,
        "releases": args.releases,
    }
    if getattr(args, "noise_multiplier", None) is not None:
        return epsilon_for(args.noise_multiplier, **common)
    return calibrate(args.epsilon, **common)


def _ledger(args: argparse.Namespace):
    from dpagg_core.privacy.ledger import Ledger

    return Ledger(args.ledger)


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


def cmd_account(args: argparse.Namespace) -> int:
    from dpagg_core.privacy.noise_comparison import noise_comparison
    from dpagg_core.privacy.plan_text import DELTA_MEANING, delta_warning, plan_summary

    if args.n is None:
        raise DpaggError("--n is required: the number of private images (public under replace-one)")
    plan = _plan(args, args.n)
    warning = delta_warning(plan.delta, args.n) if args.delta is not None else None
    comparison, block = (
        noise_comparison(plan, k=args.k, dim=args.dim)
        if math.isfinite(plan.epsilon) and plan.epsilon > 0
        else (None, "(no noise comparison: the plan's epsilon is not finite)")
    )
    payload = {
        "plan": plan.to_dict(),
        "delta_meaning": DELTA_MEANING,
        "delta_warning": warning,
        "comparison": comparison,
    }
    _emit(args, payload, f"{plan_summary(plan)}\n\n{block}\n\n{DELTA_MEANING}")
    return 0


def _release_and_report(args: argparse.Namespace, eset, plan) -> int:
    """Release ``eset`` (a private per-image file) with the CLI's release flags and print it."""
    from dpagg_core.aggregate.release import release_embeddings

    if args.clip_norm is None:
        raise DpaggError(
            "--clip-norm is required: choose C from public data (`dpagg suggest-clip-norm`) "
            "or prior knowledge; never from the private embeddings"
        )
    basis = None
    if getattr(args, "basis", None) is not None:
        from dpagg_core.aggregate.basis_builders import load_basis

        basis = load_basis(args.basis)
    outcome = release_embeddings(
        eset, plan=plan, ledger=_ledger(args), **_release_options(args, basis)
    )
    _report_release(args, outcome)
    return 0


def _public_centre(args: argparse.Namespace) -> Any:
    """The public-mean centre of ``--public-embeddings`` (a PUBLIC file; a private one is
    refused by ``public_embeddings.load_public_embeddings``), or None."""
    path = getattr(args, "public_embeddings", None)
    if path is None:
        if getattr(args, "centre", None) == "public_mean":
            raise DpaggError(
                "--centre public_mean needs --public-embeddings FILE (embeddings of PUBLIC images: "
                "`dpagg public-basis --public-images DIR --save-public-embeddings FILE`)"
            )
        return None
    if getattr(args, "centre", None) != "public_mean":
        raise DpaggError("--public-embeddings is the centre for --centre public_mean; add it")
    from dpagg_core.io.public_embeddings import public_mean_centre

    return public_mean_centre(path, ledger=_ledger(args))


def _report_release(args: argparse.Namespace, outcome: Any, method: str = "") -> None:
    """Print a ``release.ReleaseOutcome``: file, prompt, privacy record, budget."""
    from dpagg_core.report import release_text

    _emit(args, outcome.summary(), release_text(outcome, method))


def cmd_aggregate(args: argparse.Namespace) -> int:
    from dpagg_core.io.private_file import load_private

    eset = load_private(args.embeddings, key=_ledger(args).identity_key())
    return _release_and_report(args, eset, _plan(args, eset.n))


def cmd_inspect(args: argparse.Namespace) -> int:
    from dpagg_core.io.released_file import describe
    from dpagg_core.report import describe_text

    info = describe(args.file)
    _emit(args, info, describe_text(args.file, info))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from dpagg_core.privacy.audit import audit

    plan = _plan(args, args.n, warn=False)  # an audit releases nothing
    basis = None
    if getattr(args, "basis", None) is not None:
        from dpagg_core.aggregate.basis_builders import load_basis

        basis = load_basis(args.basis)
    result = audit(
        plan,
        clip_norm=1.0,
        dim=args.dim,
        trials=args.trials,
        confidence=args.confidence,
        audit_delta=args.audit_delta,
        basis=basis,
    )
    payload = {
        "plan": plan.to_dict(),
        "basis": None if basis is None else basis.record(),
        # every field of the AuditResult but its delta, which is the plan's (above)
        **{k: v for k, v in dataclasses.asdict(result).items() if k != "delta"},
    }
    _emit(args, payload, result.summary())
    return 0 if result.passed else 1


def cmd_ledger(args: argparse.Namespace) -> int:
    ledger = _ledger(args)
    if args.ledger_cmd == "set-budget":
        status = ledger.set_budget(args.dataset, args.epsilon, args.delta)
        _emit(args, status, f"budget of {args.dataset} set: {json.dumps(status, default=str)}")
        return 0
    releases = ledger.list_releases(args.dataset)
    datasets = sorted({r["dataset_id"] for r in releases} | ({args.dataset} - {None}))
    statuses = {d: ledger.status(d) for d in datasets}
    lines = [f"ledger {ledger.path}"]
    for d, st in statuses.items():
        lines.append(f"dataset {d}: {json.dumps(st, default=str)}")
        for r in releases:
            if r["dataset_id"] == d:
                files = ",".join(r["files"]) or "-"  # the file name(s) actually written
                lines.append(
                    f"  #{r['id']} {r['created']} file={files} (requested name={r['name']}) "
                    f"epsilon={r['epsilon']:.4g} delta={r['delta']:.3g} C={r['clip_norm']:.4g} "
                    f"sampling={r['plan']['sampling']}"
                )
    _emit(
        args,
        {"ledger": str(ledger.path), "datasets": statuses, "releases": releases},
        "\n".join(lines),
    )
    return 0


# --- training-based commands ------------------------------------------------------------------


def _ti_config(args: argparse.Namespace):
    from dpagg_core.training.ti import TIConfig

    values: dict[str, Any] = {
        "vectors": args.vectors,
        "initializer": args.initializer,
        "templates": args.templates,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "seed": args.seed,
    }
    if args.steps is not None:
        values["steps"] = args.steps
    if args.learning_rate is not None:
        values["learning_rate"] = args.learning_rate
    return TIConfig(**values)


def _trainer(args: argparse.Namespace, method: str = "ti"):
    """The training driver (``train_run.Trainer``) of the train flags; loads the model."""
    from dpagg_core.training.train_run import Trainer

    return Trainer(
        args.model,
        _ti_config(args),
        method=method,
        family=args.family,
        prediction_type=args.prediction_type,
        device=args.device,
        ledger=getattr(args, "ledger", None),
    )


def cmd_train(args: argparse.Namespace) -> int:
    from dpagg_core.training.distributed import is_main_process

    trainer = _trainer(args)
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

        path = save_private(eset, args.keep_private_embeddings, key=_ledger(args).identity_key())
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
    _emit(args, payload, text)
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
    if args.clip_norm is None:
        raise DpaggError(
            "--clip-norm is required: choose C from public data (`dpagg suggest-clip-norm`) "
            "or prior knowledge; never from the private embeddings"
        )
    trainer = _trainer(args, args.method)
    loaded = trainer.images(args.images)
    plan = _plan(args, loaded.count)  # plan errors surface before any training
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
        ledger=_ledger(args),
        **_release_options(args, basis),
    )
    if outcome is None:  # torchrun: rank 0 releases
        return 0
    _report_release(args, outcome)
    if args.preview and trainer.model is not None:
        from dpagg_core.showcase.preview import preview_grid

        png = preview_grid(trainer.model, outcome.path, args.name)
        print(f"preview: {png}")
    return 0


def _release_options(args: argparse.Namespace, basis: Any) -> dict[str, Any]:
    """The release options of the CLI flags (``release_embeddings``' keywords)."""
    return {
        "clip_norm": args.clip_norm,
        "name": args.name,
        "out_dir": args.out_dir,
        "centre": args.centre,
        "mode": args.clip_mode,
        "budget_epsilon": args.budget_epsilon,
        "budget_delta": args.budget_delta,
        "a1111_pt": args.a1111_pt,
        "basis": basis,
        "postprocess": getattr(args, "postprocess", "none"),
        "public_centre": _public_centre(args),
    }


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
    _report_release(args, done.outcome, f"DP-SGD, {config.steps} steps")
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


def cmd_suggest_clip_norm(args: argparse.Namespace) -> int:
    from dpagg_core.privacy.mechanism import suggest_clip_norm

    trainer = _trainer(args)
    eset = trainer.train(trainer.images(args.public_images, public=True))
    payload = suggest_clip_norm(eset, args.quantile)
    text = (
        f"suggested --clip-norm {payload['clip_norm']:.4g} (the {args.quantile:.0%} quantile of "
        f"{eset.n} PUBLIC images' distances to the initializer centre; median "
        f"{payload['distances']['median']:.4g}).\n"
        f"With --centre public_mean (the mean of these images' embeddings as the centre): "
        f"--clip-norm {payload['clip_norm_public_mean']:.4g}.\n"
        "Use the same model, initializer, vectors and TI settings for the private run."
    )
    _emit(args, payload, text)
    return 0


def _k_arg(text: str) -> int | str:
    """``--k`` of public-basis: a positive integer, or ``auto`` (:func:`basis_choice.choose_k`)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: pass a positive integer or 'auto'") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: pass a positive integer or 'auto'")
    return k


def _public_style_folders(folder: Path) -> list[Path]:
    """The immediate, non-hidden subfolders of ``folder`` that hold at least one image file (one
    PUBLIC style each, for ``--k auto``); refuses loose images beside them."""
    from dpagg_core.io.images import IMAGE_EXTENSIONS

    def is_image(p: Path) -> bool:
        return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS

    if not folder.is_dir():
        raise DpaggError(f"--public-images {folder} is not a folder")
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    styles = [
        e
        for e in entries
        if e.is_dir() and not e.name.startswith(".") and any(is_image(f) for f in e.iterdir())
    ]
    loose = [e.name for e in entries if is_image(e)]
    if len(styles) < 3:
        raise DpaggError(
            f"--k auto needs --public-images {folder} to hold at least 3 subfolders of images, "
            f"one per PUBLIC style (found {len(styles)}): k is chosen by holding out one style at "
            "a time. Put the public images in >= 3 subfolders, one per style, or pass --k K."
        )
    if loose:
        raise DpaggError(
            f"--k auto reads one subfolder per PUBLIC style, but {folder} also holds "
            f"{len(loose)} image(s) outside them ({', '.join(loose[:5])}"
            f"{' ...' if len(loose) > 5 else ''}); move them into a style subfolder"
        )
    return styles


def _k_choice_text(choice: Any) -> str:
    lines = [f"choice of k on {choice.groups} PUBLIC styles (leave one style out):"]
    lines.append(f"  {'k':>5}  {'worst cos':>9}  {'mean cos':>8}")
    for r in choice.rows:
        if r["usable"]:
            cells = f"{r['cos_min']:9.4f}  {r['cos_mean']:8.4f}"
        else:
            cells = f"{'-':>9}  {'-':>8}  (not usable: too few public directions)"
        mark = "  <- chosen" if r["k"] == choice.k else ""
        lines.append(f"  {r['k']:>5}  {cells}{mark}")
    if choice.met:
        lines.append(f"k = {choice.k}: the smallest with mean cosine >= {choice.min_cos:g}")
    else:
        lines.append(
            f"no k reached mean cosine >= {choice.min_cos:g}; k = {choice.k} has the largest "
            "mean cosine (add public styles or images for a better basis)"
        )
    return "\n".join(lines)


def cmd_public_basis(args: argparse.Namespace) -> int:
    """``dpagg public-basis``: a PUBLIC basis for ``--basis`` (``aggregate.basis_builders``),
    from the model's token table or from per-image TI embeddings of PUBLIC images. ``--k auto``
    chooses k on the public styles (subfolders) only (``basis_choice.choose_k``)."""
    from dpagg_core.aggregate.basis_builders import (
        basis_from_public_embeddings,
        basis_from_token_table,
        save_basis,
    )
    from dpagg_core.training.public import train_public_embeddings

    choice, styles, clip_norms = None, None, None
    if args.kind == "public_embeddings":
        if args.public_images is None:
            raise DpaggError("--kind public_embeddings needs --public-images DIR (PUBLIC images)")
        from dpagg_core.training.train_run import progress_bar

        styles = _public_style_folders(args.public_images) if args.k == "auto" else None
        trainer = _trainer(args)
        if styles is None:
            loaded = [trainer.images(args.public_images, public=True)]
        else:
            loaded = [trainer.images(folder, public=True) for folder in styles]
        count = sum(part.count for part in loaded)
        import torch

        pixels = torch.cat([part.pixels for part in loaded]) if styles else loaded[0].pixels
        update, close = progress_bar(f"per-image TI of {count} PUBLIC images")
        try:
            public = train_public_embeddings(
                trainer.backend, pixels, trainer.config, progress=update
            )
        finally:
            close()
        from dpagg_core.privacy.identity import image_ids_for

        key = _ledger(args).identity_key()
        public.source_ids = tuple(
            i for part in loaded for i in image_ids_for(part.digests, key=key)
        )
        k = args.k
        if styles is not None:
            from dpagg_core.aggregate.basis_choice import auto_k_candidates, choose_k

            groups = [i for i, part in enumerate(loaded) for _ in range(part.count)]
            width = min(int(t.shape[-1]) for t in public.vectors.values())
            choice = choose_k(public, groups, auto_k_candidates(width))
            k = choice.k
        basis = basis_from_public_embeddings(public, k)
        from dpagg_core.aggregate.basis_choice import subspace_clip_norms

        clip_norms = subspace_clip_norms(public, basis)
        if args.save_public_embeddings is not None:
            from dpagg_core.io.public_embeddings import save_public_embeddings

            save_public_embeddings(public, args.save_public_embeddings, key=key)
    else:
        if args.k == "auto":
            raise DpaggError(
                "--k auto chooses k on PUBLIC image styles (--kind public_embeddings); with "
                "--kind token_table pass an integer --k"
            )
        if args.public_images is not None or args.save_public_embeddings is not None:
            raise DpaggError(
                "--public-images/--save-public-embeddings are for --kind public_embeddings"
            )
        from dpagg_core.training.models import _text_encoders, load_pipeline

        model = load_pipeline(args.model, family=args.family, device="cpu")
        basis = basis_from_token_table(
            _text_encoders(model.pipe), args.k, vectors=args.vectors, model_family=model.family
        )
        if basis.base_model_id != model.base_model_id:  # pragma: no cover - same fingerprint
            raise DpaggError("internal: the token-table basis does not name the loaded model")
    path = save_basis(basis, args.out)
    payload = {"file": str(path), **basis.record(), "vectors": basis.vectors}
    text = (
        f"wrote PUBLIC basis {path}: kind {basis.kind}, k {basis.k} per vector "
        f"({basis.dim} noised coordinates of D = {basis.flat_dim}), sha256 {basis.sha256[:16]}...\n"
        f"use it with: dpagg aggregate/run ... --basis {path}"
    )
    if clip_norms is not None:
        payload["suggested_clip_norm"] = clip_norms
        text += (
            f"\nsuggested --clip-norm with this basis (median of the public images' distances in "
            f"its K coordinates): {clip_norms['initializer']:.4g} around the initializer, "
            f"{clip_norms['public_mean']:.4g} with --centre public_mean"
        )
    if choice is not None:
        payload["k_choice"] = {
            "k": choice.k,
            "met": choice.met,
            "min_cos": choice.min_cos,
            "groups": [folder.name for folder in styles],
            "rows": [dict(r) for r in choice.rows],
        }
        text = _k_choice_text(choice) + "\n" + text
    _emit(args, payload, text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dpagg_core.showcase.demo import run_demo

    return run_demo(args.out_dir, aggregation_only=args.aggregation_only, as_json=args.json)


# ----------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON on stdout")
    common.add_argument("-v", "--verbose", action="store_true")

    parser = argparse.ArgumentParser(
        prog="dpagg",
        description="Differentially private textual-inversion embeddings (DPAgg-TI).",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"dpagg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("account", parents=[common], help="noise <-> epsilon for a plan")
    _add_plan_args(p)
    p.add_argument("--n", type=int, help="number of private images")
    p.add_argument(
        "--dim",
        type=int,
        default=None,
        help="D: values per embedding (e.g. 768 for SD1 with 1 vector): prints the noise norm",
    )
    p.add_argument(
        "--k",
        type=int,
        default=None,
        help="K: noised coordinates in a public basis (`dpagg public-basis` prints it: k per "
        "vector x vectors, x2 for SDXL): the subspace's effect on the noise norm (needs --dim)",
    )
    p.set_defaults(func=cmd_account)

    p = sub.add_parser(
        "aggregate", parents=[common], help="release a DP mean of a private embedding set"
    )
    p.add_argument(
        "--embeddings", type=_user_path, required=True, help="private embedding set file"
    )
    _add_plan_args(p, allow_noise=False)
    _add_release_args(p)
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("train", parents=[common], help="per-image textual inversion")
    _add_train_args(p)
    _add_ledger_args(p)  # its key ids the image set (and authenticates the private file)
    p.add_argument(
        "--keep-private-embeddings",
        type=_user_path,
        help="write the PRIVATE per-image embeddings to this file (a warning is printed)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", parents=[common], help="train per image, then release privately")
    _add_train_args(p)
    _add_plan_args(p, allow_noise=False)
    _add_release_args(p)
    p.add_argument("--method", choices=("ti", "clip", "dpsgd"), default="ti")
    p.add_argument("--preview", action="store_true", help="also render a small preview grid")
    g = p.add_argument_group("DP-SGD baseline (--method dpsgd; --steps, --learning-rate apply)")
    g.add_argument(
        "--expected-batch", type=float, help="expected Poisson batch size qn (default 8)"
    )
    g.add_argument(
        "--grad-clip-norm", type=float, help="per-example gradient clip C_g (default 1e-3)"
    )
    g.add_argument("--optimizer", choices=("adam", "sgd"), help="default adam")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("suggest-clip-norm", parents=[common], help="pick C from PUBLIC images")
    _add_train_args(p)
    p.set_defaults(images=None)
    for action in p._actions:
        if action.dest == "images":
            action.required = False
    p.add_argument("--public-images", type=_user_path, required=True, help="PUBLIC images only")
    _add_ledger_args(p)  # pictures it records as private are refused
    p.add_argument("--quantile", type=float, default=0.9)
    p.set_defaults(func=cmd_suggest_clip_norm)

    p = sub.add_parser("public-basis", parents=[common], help="a PUBLIC subspace basis for --basis")
    _add_train_args(p)
    _add_ledger_args(p)  # pictures it records as private are refused; it keys the file's tag
    p.set_defaults(images=None)
    for action in p._actions:
        if action.dest == "images":
            action.required = False
    p.add_argument(
        "--kind",
        choices=("token_table", "public_embeddings"),
        default="public_embeddings",
        help="PCA of the model's token table, or of TI embeddings of --public-images",
    )
    p.add_argument("--public-images", type=_user_path, default=None, help="PUBLIC images only")
    p.add_argument(
        "--k",
        type=_k_arg,
        default=8,
        help="directions per vector (public; default 8), or 'auto': the smallest of 4, 8, 12, "
        "16, 24, 32, 48, 64, ... whose mean cosine to a held-out public style's mean is >= 0.95 "
        "(--public-images then holds >= 3 subfolders, one per public style)",
    )
    p.add_argument("--out", type=_user_path, required=True, help="basis file (.safetensors)")
    p.add_argument(
        "--save-public-embeddings",
        type=_user_path,
        default=None,
        help="also write the PUBLIC per-image embeddings (for --centre public_mean)",
    )
    p.set_defaults(func=cmd_public_basis)

    p = sub.add_parser("audit", parents=[common], help="empirical privacy audit of the mechanism")
    _add_plan_args(p)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--dim", type=int, default=4)
    p.add_argument("--trials", type=int, default=20_000, help="per neighbour (default 20000)")
    p.add_argument("--confidence", type=float, default=0.99)
    p.add_argument(
        "--audit-delta",
        type=float,
        default=None,
        help="delta of the privacy-profile point to test (default: the most powerful one)",
    )
    p.add_argument(
        "--basis",
        type=_user_path,
        default=None,
        help="audit the projected mechanism (a basis file)",
    )
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("ledger", parents=[common], help="show the ledger or set a budget")
    lsub = p.add_subparsers(dest="ledger_cmd", required=True)
    ls = lsub.add_parser("show", parents=[common], help="budgets and releases")
    ls.add_argument("--dataset", default=None)
    _add_ledger_args(ls)
    lb = lsub.add_parser("set-budget", parents=[common], help="set or raise a dataset's budget")
    lb.add_argument("--dataset", required=True)
    lb.add_argument("--epsilon", type=float, required=True)
    lb.add_argument("--delta", type=float, required=True)
    _add_ledger_args(lb)
    p.set_defaults(func=cmd_ledger)

    p = sub.add_parser("inspect", parents=[common], help="print a released file's privacy record")
    p.add_argument("file", type=_user_path)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", parents=[common], help="end-to-end demo on a tiny offline model")
    p.add_argument(
        "--out-dir", type=_user_path, default=None, help="where to write (default: temp)"
    )
    p.add_argument("--aggregation-only", action="store_true", help="skip the TI training part")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="dpagg: %(levelname)s: %(message)s",
    )
    for name in ("epsilon", "delta", "noise_multiplier", "clip_norm", "q"):
        value = getattr(args, name, None)
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    try:
        return int(args.func(args) or 0)
    except DpaggError as exc:
        print(f"dpagg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
