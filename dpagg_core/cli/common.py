"""What the ``dpagg`` commands share: the argument groups (plan, release, training, ledger), path
arguments, output (text or ``--json``), and turning flags into core objects (the plan, the
ledger, the TI config and trainer, the release options)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from dpagg_core import options
from dpagg_core.errors import DpaggError

log = logging.getLogger("dpagg")


def emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    from dpagg_core.budget_report import print_payload

    print_payload(payload, text, as_json=args.json)


def add_plan_args(p: argparse.ArgumentParser, *, allow_noise: bool = True) -> None:
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
    g.add_argument("--sampling", choices=options.SAMPLINGS, default="full")
    g.add_argument("--m", type=int, help="subsample size for --sampling wor")
    g.add_argument("--q", type=float, help="sampling rate for --sampling poisson")
    g.add_argument("--releases", type=int, default=1, help="releases the plan covers (k)")


def user_path(text: str) -> Path:
    """Every path argument: ``~`` and environment variables expanded, made absolute - the same
    meaning as ``DPAGG_LEDGER`` / ``DPAGG_DATA_DIR``, the ComfyUI nodes and the library
    (``paths.resolve_path``)."""
    from dpagg_core.paths import resolve_path

    return resolve_path(text)


def add_ledger_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ledger",
        type=user_path,
        help="ledger file (default: $DPAGG_LEDGER or the user data dir); its key ids the images",
    )


def add_mechanism_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """How the mean is released (clip norm, centre, basis, post-processing): shared by a real
    release and a rehearsal, so both release the same way."""
    g = p.add_argument_group("release")
    g.add_argument("--clip-norm", type=float, help="clip norm C (public; see suggest-clip-norm)")
    g.add_argument(
        "--centre",
        choices=options.CENTRES,
        default=None,
        help="public centre to clip around; public_mean: the mean embedding of PUBLIC images "
        "(--public-embeddings)",
    )
    g.add_argument(
        "--public-embeddings",
        type=user_path,
        default=None,
        help="PUBLIC per-image embeddings (`dpagg public-basis --save-public-embeddings`) whose "
        "mean is the centre for --centre public_mean",
    )
    g.add_argument("--clip-mode", choices=options.CLIP_MODES, default="clip")
    g.add_argument(
        "--basis",
        type=user_path,
        default=None,
        help="PUBLIC basis file (`dpagg public-basis`): aggregate and add noise in its k dims",
    )
    g.add_argument(
        "--postprocess",
        choices=options.POSTPROCESS,
        default="none",
        help="free post-processing of the release: James-Stein shrinkage and/or norm rescaling",
    )
    return g


def require_clip_norm(args: argparse.Namespace) -> float:
    """``--clip-norm``, which every release and rehearsal needs and nothing may compute from
    private data."""
    if args.clip_norm is None:
        raise DpaggError(
            "--clip-norm is required: choose C from public data (`dpagg suggest-clip-norm`) "
            "or prior knowledge; never from the private embeddings"
        )
    return float(args.clip_norm)


def require_budget(args: argparse.Namespace, dataset_id: str, plan: Any) -> None:
    """An image set's first release needs a deliberate ``--budget-epsilon`` (issue 20 item 10;
    ``budget_report.needs_budget``): refused before anything trains or is spent."""
    from dpagg_core.budget_report import budget_required_message, budget_status, needs_budget

    recorded = budget_status(ledger_of(args), dataset_id)["budget"]
    if needs_budget(recorded, getattr(args, "budget_epsilon", None)):
        raise DpaggError(budget_required_message(plan.epsilon, "--budget-epsilon E", refused=True))


def add_release_args(p: argparse.ArgumentParser) -> None:
    g = add_mechanism_args(p)
    g.add_argument("--name", required=True, help="embedding name (used as embedding:<name>)")
    g.add_argument("--out-dir", type=user_path, required=True, help="folder for <name>.safetensors")
    g.add_argument("--budget-epsilon", type=float, help="dataset budget on first release")
    g.add_argument("--budget-delta", type=float, help="dataset delta budget on first release")
    g.add_argument("--a1111-pt", action="store_true", help="also write an A1111 .pt file")
    add_ledger_args(p)


def add_train_args(p: argparse.ArgumentParser, *, private_images: bool = True) -> None:
    """The training flags; ``private_images=False`` for the commands that train on
    ``--public-images`` only (``--images`` is then optional and unused)."""
    g = p.add_argument_group("per-image textual inversion")
    g.add_argument(
        "--images", type=user_path, required=private_images, help="folder of private images"
    )
    g.add_argument("--model", type=user_path, required=True, help="diffusers folder or checkpoint")
    g.add_argument("--family", choices=options.TI_FAMILIES, help="override model detection")
    g.add_argument("--prediction-type", choices=options.PREDICTION_TYPES)
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--learning-rate", type=float, default=None)
    g.add_argument("--vectors", type=int, default=1, help="vectors per token (1-8)")
    g.add_argument("--initializer", default="painting", help="one-token initializer (public)")
    g.add_argument("--templates", choices=options.TEMPLATE_KINDS, default="style")
    g.add_argument("--resolution", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--mixed-precision", choices=options.MIXED_PRECISIONS, default="no")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: best)")
    g.add_argument("--seed", type=int, default=0, help="TI randomness only (never the DP noise)")


def default_delta(delta: float | None) -> float:
    from dpagg_core.privacy.plan import DEFAULT_DELTA

    return DEFAULT_DELTA if delta is None else delta


def plan_of(args: argparse.Namespace, n: int, *, warn: bool = True):
    """The plan from the plan flags; a user-chosen --delta above the safe default is warned
    about on stderr (``plan_text.delta_warning``) before anything runs."""
    from dpagg_core.privacy.calibration import plan_from_inputs
    from dpagg_core.privacy.plan_text import delta_warning

    delta = default_delta(args.delta)
    warning = delta_warning(delta, n) if args.delta is not None else None
    if warn and warning:
        log.warning("%s", warning)
    noise = getattr(args, "noise_multiplier", None)
    return plan_from_inputs(
        n=n,
        delta=delta,
        epsilon=None if noise is not None else args.epsilon,
        noise_multiplier=noise,
        sampling=args.sampling,
        m=args.m,
        q=args.q,
        releases=args.releases,
    )


def ledger_of(args: argparse.Namespace):
    from dpagg_core.privacy.ledger import Ledger

    return Ledger(args.ledger)


def ti_config(args: argparse.Namespace):
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


def trainer_of(args: argparse.Namespace, method: str = "ti"):
    """The training driver (``train_run.Trainer``) of the train flags; loads the model."""
    from dpagg_core.training.train_run import Trainer

    return Trainer(
        args.model,
        ti_config(args),
        method=method,
        family=args.family,
        prediction_type=args.prediction_type,
        device=args.device,
        ledger=getattr(args, "ledger", None),
    )


def public_centre(args: argparse.Namespace) -> Any:
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

    return public_mean_centre(path, ledger=ledger_of(args))


def release_options(args: argparse.Namespace, basis: Any) -> dict[str, Any]:
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
        "public_centre": public_centre(args),
    }


def report_release(args: argparse.Namespace, outcome: Any, method: str = "") -> None:
    """Print a ``release.ReleaseOutcome``: file, prompt, privacy record, budget."""
    from dpagg_core.budget_report import release_text

    emit(args, outcome.summary(), release_text(outcome, method))
