"""The ``dpagg`` command: account, aggregate, train, run, demo, audit, ledger, inspect.

Every command takes ``--json`` (machine-readable output on stdout). Errors are one line on stderr
naming the offending parameter and the fix, with exit status 2; nothing is spent on bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import DpaggError

log = logging.getLogger("dpagg")


# ----------------------------------------------------------------------------------------------
# Output helpers
# ----------------------------------------------------------------------------------------------


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, sort_keys=True, default=str))
    else:
        print(text)


def _record_text(record: dict[str, str]) -> str:
    width = max(len(k) for k in record)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in sorted(record.items()))


def _budget_text(summary: dict[str, Any]) -> str:
    b = summary["budget"]
    return (
        f"budget: spent epsilon {b['spent_epsilon']:.4g} of {b['epsilon']:.4g} "
        f"(remaining {b['remaining_epsilon']:.4g}), delta {b['spent_delta']:.3g} of "
        f"{b['delta']:.3g} [{b['composition']} composition]"
    )


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
    from .paths import resolve_path

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
    from .accountant import DEFAULT_DELTA

    return DEFAULT_DELTA if delta is None else delta


def _plan(args: argparse.Namespace, n: int, *, warn: bool = True):
    """The plan from the plan flags; a user-chosen --delta above the safe default is warned
    about on stderr (``accountant.delta_warning``) before anything runs."""
    from .accountant import calibrate, delta_warning, epsilon_for

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
    from .ledger import Ledger

    return Ledger(args.ledger)


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


def cmd_account(args: argparse.Namespace) -> int:
    from .accountant import DELTA_MEANING, delta_warning, plan_summary

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


def noise_comparison(
    plan: Any, *, k: int | None = None, dim: int | None = None
) -> tuple[dict[str, Any], str]:
    """For the (epsilon, delta, n, releases) of ``plan``: the noise of the paper's configuration
    (a secret subsample of m = n/10 without replacement, arXiv 2411.14639) next to the plan dpagg
    recommends (``full``: every image, no subsample), both calibrated to the same epsilon; and,
    with ``dim`` (D, values per embedding) and ``k`` (K, noised coordinates in a public basis),
    the subspace's effect on the noise norm (``dpagg_core.subspace``). Noise is given in units of
    the clip norm C: per coordinate ``sigma / C``, and the expected norm of the noise vector,
    about ``sigma sqrt(D)`` (the signal, a mean of clipped deltas, has norm <= C)."""
    from .accountant import calibrate

    if k is not None and (dim is None or not 1 <= k <= dim):
        raise DpaggError(f"--k {k}: give --dim D too, and 1 <= K <= D (K noised coordinates)")
    if dim is not None and dim < 1:
        raise DpaggError(f"--dim {dim}: the number of values per embedding (e.g. 768)")
    common = {"releases": plan.releases}
    m = max(1, round(plan.n / 10))
    paper = calibrate(plan.epsilon, plan.delta, plan.n, "wor", m=m, **common)
    full = calibrate(plan.epsilon, plan.delta, plan.n, "full", **common)

    def row(p: Any) -> dict[str, Any]:
        std = float(p.noise_std(1.0))
        out = {
            "sampling": p.sampling,
            "m": p.m,
            "noise_multiplier": float(p.noise_multiplier),
            "noise_std_per_C": std,
            "epsilon": float(p.epsilon),
        }
        if dim is not None:
            out["noise_norm_per_C"] = std * math.sqrt(dim)
        return out

    payload: dict[str, Any] = {
        "epsilon": float(plan.epsilon),
        "delta": float(plan.delta),
        "n": int(plan.n),
        "paper": row(paper),
        "recommended": row(full),
        "paper_noise_ratio": float(paper.noise_std(1.0) / full.noise_std(1.0)),
        "subspace": None,
    }
    std = full.noise_std(1.0)
    names = (f"paper (subsample m = {m} of {plan.n}, wor):", f"dpagg (all {plan.n} images, full):")
    labels = [x.ljust(max(map(len, names)) + 1) for x in names]
    lines = [
        f"Noise at epsilon {plan.epsilon:.4g}, delta {plan.delta:.3g}, n = {plan.n} (replace-one"
        + (f", {plan.releases} releases" if plan.releases > 1 else "")
        + "), in units of the clip norm C:",
        f"  {labels[0]}noise multiplier {paper.noise_multiplier:.4g}, noise std "
        f"{paper.noise_std(1.0):.4g} C per coordinate",
        f"  {labels[1]}noise multiplier {full.noise_multiplier:.4g}, noise std "
        f"{std:.4g} C per coordinate  <- recommended",
        f"  the paper's configuration has {payload['paper_noise_ratio']:.2f}x the noise",
    ]
    if dim is not None:
        lines.append(
            f"  noise norm over D = {dim} coordinates: ~{std * math.sqrt(dim):.4g} C (paper "
            f"~{paper.noise_std(1.0) * math.sqrt(dim):.4g} C); the signal has norm <= C"
        )
    if k is not None and dim is not None:
        ratio = math.sqrt(k / dim)
        payload["subspace"] = {
            "K": int(k),
            "D": int(dim),
            "noise_norm_per_C": std * math.sqrt(k),
            "full_noise_norm_per_C": std * math.sqrt(dim),
            "noise_norm_ratio": ratio,
        }
        lines.append(
            f"  in a public subspace (--basis) with K = {k} noised coordinates: noise norm "
            f"~{std * math.sqrt(k):.4g} C instead of ~{std * math.sqrt(dim):.4g} C (x{ratio:.2f}); "
            "same epsilon, the part of the mean outside the subspace is lost"
        )
    return payload, "\n".join(lines)


def _release_and_report(args: argparse.Namespace, eset, plan, *, default_centre: str) -> int:
    from .release import release_embeddings

    if args.clip_norm is None:
        raise DpaggError(
            "--clip-norm is required: choose C from public data (`dpagg suggest-clip-norm`) "
            "or prior knowledge; never from the private embeddings"
        )
    basis = None
    if getattr(args, "basis", None) is not None:
        from .subspace import load_basis

        basis = load_basis(args.basis)
    outcome = release_embeddings(
        eset,
        plan=plan,
        clip_norm=args.clip_norm,
        name=args.name,
        out_dir=args.out_dir,
        ledger=_ledger(args),
        centre=args.centre or default_centre,
        mode=args.clip_mode,
        budget_epsilon=args.budget_epsilon,
        budget_delta=args.budget_delta,
        a1111_pt=args.a1111_pt,
        basis=basis,
        postprocess=getattr(args, "postprocess", "none"),
        public_centre=_public_centre(args),
    )
    _report_release(args, outcome)
    return 0


def _public_centre(args: argparse.Namespace) -> Any:
    """The public-mean centre of ``--public-embeddings`` (a PUBLIC file; a private one is
    refused by ``subspace.load_public_embeddings``), or None."""
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
    from .subspace import public_mean_centre

    return public_mean_centre(path)


def _report_release(args: argparse.Namespace, outcome: Any, method: str = "") -> None:
    """Print a ``release.ReleaseOutcome``: file, prompt, privacy record, budget."""
    summary = outcome.summary()
    label = f" {method}" if method else ""
    head = (
        f"re-used the identical earlier{label} release (nothing spent)"
        if outcome.reused
        else f"released {outcome.path}" + (f" ({method})" if method else "")
    )
    text = "\n".join(
        [
            head,
            f"use it in a prompt as: {outcome.prompt}",
            "privacy record (stored in the file header):",
            _record_text(outcome.record),
            _budget_text(summary),
        ]
    )
    _emit(args, summary, text)


def cmd_aggregate(args: argparse.Namespace) -> int:
    from .embeddings import load_private

    eset = load_private(args.embeddings, key=_ledger(args).identity_key())
    plan = _plan(args, eset.n)
    default_centre = "initializer" if eset.centre is not None else "origin"
    return _release_and_report(args, eset, plan, default_centre=default_centre)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .embeddings import describe

    info = describe(args.file)
    lines = [f"{args.file}:"]
    for k, v in info.items():
        if isinstance(v, dict):
            lines.append(f"{k}:")
            lines.append(_record_text({str(a): str(b) for a, b in v.items()}) if v else "  -")
        else:
            lines.append(f"{k}: {v}")
    _emit(args, info, "\n".join(lines))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit import audit

    plan = _plan(args, args.n, warn=False)  # an audit releases nothing
    basis = None
    if getattr(args, "basis", None) is not None:
        from .subspace import load_basis

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
        "claimed_epsilon": result.claimed_epsilon,
        "audit_delta": result.audit_delta,
        "audit_epsilon": result.audit_epsilon,
        "empirical_epsilon_lower_bound": result.empirical_epsilon_lower_bound,
        "confidence": result.confidence,
        "trials": result.trials,
        "passed": result.passed,
        "detectable_epsilon": result.detectable_epsilon,
        "detectable_noise_factor": result.detectable_noise_factor,
        "power_half_noise": result.power_half_noise,
        "half_noise_epsilon": result.half_noise_epsilon,
        "seconds": result.seconds,
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


def _ti_config(args: argparse.Namespace, **overrides: Any):
    from .ti import TIConfig

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
    values.update(overrides)
    return TIConfig(**values)


def _progress_bar(desc: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    from tqdm.auto import tqdm

    bar: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "b" not in bar:
            bar["b"] = tqdm(total=total, desc=desc, unit="step", file=sys.stderr)
        bar["b"].n = done
        bar["b"].refresh()

    def close() -> None:
        if "b" in bar:
            bar["b"].close()

    return update, close


def _device(args: argparse.Namespace) -> str:
    import torch

    if args.device:
        return args.device
    if not torch.cuda.is_available():
        return "cpu"
    if _distributed_world() > 1:  # torchrun: one GPU per rank
        import os

        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cuda"


def _load_images(folder: Path, resolution: int, ledger: Path | None = None):
    """The image folder through the canonical decode (``dpagg_core.images``, the same as
    ComfyUI's Load Image); its dataset id is keyed by the key of the ledger ``--ledger``, so the
    CLI and the ComfyUI nodes give the same pictures the same id. Logs its own warnings."""
    from .images import load_image_folder

    return load_image_folder(folder, resolution=resolution, ledger=ledger)


class _Trainer:
    """Loads the model once, then trains per-image embeddings of an image folder in memory."""

    def __init__(self, args: argparse.Namespace, method: str = "ti") -> None:
        self.args = args
        self.method = method
        self.model = None
        self.backend = None
        if method == "ti":
            from .diffusers_backend import DiffusersBackend
            from .models import load_pipeline

            self.model = load_pipeline(
                args.model,
                family=args.family,
                prediction_type=args.prediction_type,
                device=_device(args),
            )
            self.backend = DiffusersBackend.from_loaded(self.model)
            self.config = _ti_config(
                args, resolution=args.resolution or self.backend.default_resolution
            )
            self.resolution = int(self.config.resolution)
        else:
            self.resolution = args.resolution or 224

    def images(self, folder: Path):
        return _load_images(folder, self.resolution, getattr(self.args, "ledger", None))

    def train(self, loaded):
        if self.method == "clip":
            from .clip_image import clip_image_embeddings

            return clip_image_embeddings(self.args.model, loaded, device=_device(self.args))
        update, close = _progress_bar(f"per-image TI ({loaded.count} images)")
        try:
            if _distributed_world() > 1:
                from .distributed import train_distributed

                return train_distributed(
                    self.backend,
                    loaded.pixels,
                    self.config,
                    dataset_id=loaded.dataset_id,
                    progress=update,
                )
            from .ti import train_embeddings

            return train_embeddings(
                self.backend,
                loaded.pixels,
                self.config,
                dataset_id=loaded.dataset_id,
                progress=update,
            )
        finally:
            close()


def _distributed_world() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_rank0() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def cmd_train(args: argparse.Namespace) -> int:
    trainer = _Trainer(args)
    eset = trainer.train(trainer.images(args.images))
    if eset is None or not _is_rank0():
        return 0
    payload = {
        "n": eset.n,
        "kind": eset.kind,
        "shapes": {k: list(v.shape) for k, v in eset.vectors.items()},
    }
    if args.keep_private_embeddings:
        from .embeddings import save_private

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
    if args.method == "dpsgd":
        return _run_dpsgd(args)
    trainer = _Trainer(args, args.method)
    loaded = trainer.images(args.images)
    plan = _plan(args, loaded.count)  # plan errors surface before any training
    # An over-budget request is refused before hours of training, not just before the noise.
    _ledger(args).check(
        loaded.dataset_id, plan, budget_epsilon=args.budget_epsilon, budget_delta=args.budget_delta
    )
    _public_centre(args)  # a missing or private --public-embeddings: refused before training
    if args.basis is not None and trainer.backend is not None:  # a misfit basis: before training
        from .subspace import check_basis, load_basis

        backend = trainer.backend
        check_basis(
            load_basis(args.basis),
            flat_dim=args.vectors * sum(backend.embedding_dims.values()),
            base_model_id=backend.base_model_id or "",
            model_family=backend.model_family,
            vectors=args.vectors,
        )
    eset = trainer.train(loaded)
    model = trainer.model
    if not _is_rank0():
        return 0
    if args.clip_norm is None and args.method == "clip":
        args.clip_norm = 1.0  # L2-normalised CLIP image embeddings around the origin
    code = _release_and_report(
        args, eset, plan, default_centre="initializer" if eset.centre is not None else "origin"
    )
    if args.preview and model is not None:
        from .preview import preview_grid

        png = preview_grid(model, args.out_dir / f"{args.name}.safetensors", args.name)
        print(f"preview: {png}")
    return code


def _run_dpsgd(args: argparse.Namespace) -> int:
    """``dpagg run --method dpsgd``: the DP-SGD textual-inversion baseline (``dpagg_core.dpsgd``),
    released through the same ledger and file writer as DPAgg (docs/privacy.md invariant 5).

    Order: the options, the output name and folder are checked; the model and images are loaded;
    the plan is calibrated (PLD over T Poisson steps at rate q = expected_batch / n, replace-one);
    a dry run of ``Ledger.charge`` then either finds an identical completed request (its stored
    result is written again, nothing spent, nothing trained) or refuses an over-budget request
    before any training. ``train_dpsgd`` calls ``Ledger.charge`` after all its own checks and
    before the first noise draw (the spend is committed from then on); the result is stored with
    ``Ledger.complete`` and written with ``embeddings.write_released`` (post-processing, free).
    A failure after the charge leaves the spend recorded; re-running the identical command
    charges again (``Ledger.charge``, attempts).
    """
    import dataclasses

    import numpy as np

    from .dpsgd import DPSGDConfig, calibrate_dpsgd, train_dpsgd, validate_config
    from .embeddings import next_free_name, sanitize_name
    from .release import _writable_folder, write_outcome
    from .ti import public_centre

    _dpsgd_refuse_dpagg_options(args)
    base = sanitize_name(args.name)
    out = Path(args.out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise DpaggError(f"--out-dir {out} is a file; pass a folder (models/embeddings)")
    _writable_folder(out)
    trainer = _Trainer(args)
    loaded = trainer.images(args.images)
    n = loaded.count
    values: dict[str, Any] = {
        "vectors": args.vectors,
        "initializer": args.initializer,
        "templates": args.templates,
        "resolution": trainer.resolution,
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
    validate_config(config, n)
    from .accountant import delta_warning

    if args.delta is not None and (warning := delta_warning(args.delta, n)):
        log.warning("%s", warning)
    plan = calibrate_dpsgd(
        args.epsilon,
        _default_delta(args.delta),
        n=n,
        q=config.sampling_rate(n),
        steps=config.steps,
    )
    backend, ledger = trainer.backend, _ledger(args)
    keys = tuple(backend.encoder_keys)
    basis = None
    if args.basis is not None:  # public-subspace DP-SGD; a misfit basis is refused before all
        from .subspace import check_basis, load_basis

        basis = check_basis(
            load_basis(args.basis),
            flat_dim=config.vectors * sum(backend.embedding_dims.values()),
            base_model_id=backend.base_model_id or "",
            model_family=backend.model_family,
            vectors=config.vectors,
        )
    request = _dpsgd_request(config, trainer.model)
    if basis is not None:
        request["basis_sha256"] = basis.sha256
    charge_args: dict[str, Any] = {
        "dataset_id": loaded.dataset_id,
        "plan": plan,
        "request": request,
        "name": base,
        "clip_norm": float(config.clip_norm),
        "centre_kind": "initializer",
        "base_model_id": backend.base_model_id or "",
        "budget_epsilon": args.budget_epsilon,
        "budget_delta": args.budget_delta,
    }
    # Over budget: refused here, before any training. Identical and complete: reused.
    charge = ledger.check_charge(**charge_args)
    if not charge.reused and next_free_name(out, base) != base:
        raise DpaggError(
            f"an embedding named {base!r} already exists in {out}; dpagg never overwrites: choose "
            f"another --name (e.g. {next_free_name(out, base)!r}). Nothing was spent."
        )
    if charge.reused:
        vectors = _dpsgd_unflat(charge.release.vector, public_centre(backend, trainer.config))
        record = dict(charge.release.record)
    else:
        charged: list[Any] = []

        def before_noise(_plan: Any) -> None:
            result = ledger.charge(**charge_args)  # commits the spend; BudgetExceeded: untrained
            charged.append(result)
            if result.reused:  # a concurrent identical run completed meanwhile
                raise _DpsgdReused()

        update, close = _progress_bar(f"DP-SGD TI ({n} images, {config.steps} steps)")
        try:
            trained = train_dpsgd(
                backend,
                loaded.pixels,
                config,
                plan=plan,
                before_noise=before_noise,
                progress=update,
                basis=basis,
            )
        except _DpsgdReused:
            trained = None
        except KeyboardInterrupt:
            if charged:
                log.warning("interrupted after the charge: its privacy cost stays spent")
            raise
        except Exception as exc:
            if not charged:
                raise  # failed before the charge: nothing spent
            raise DpaggError(
                f"DP-SGD failed after its privacy cost was charged (ledger {ledger.path}, release "
                f"#{charged[0].release_id}, attempt {charged[0].attempt}): {exc}. The spend stays "
                "recorded (noise may have been drawn); re-running the identical command trains "
                "and charges again."
            ) from exc
        finally:
            close()
        charge = charged[0]
        if trained is None:
            vectors = _dpsgd_unflat(charge.release.vector, public_centre(backend, trainer.config))
            record = dict(charge.release.record)
        else:
            vectors = {k: trained.vectors[k] for k in keys}  # float32 [v, dim]
            record = dict(trained.record)
            flat = np.concatenate([vectors[k].double().reshape(-1).numpy() for k in keys])
            try:
                done = ledger.complete(charge.release_id, flat, record)
                charge = dataclasses.replace(
                    charge,
                    spent_epsilon=done.spent_epsilon,
                    spent_delta=done.spent_delta,
                    composition=done.composition,
                )
            except DpaggError as exc:  # the spend is recorded; the result is still DP
                log.warning(
                    "release #%d is spent but its result could not be stored in the ledger "
                    "(%s); the file is written, but re-running this command would spend again",
                    charge.release_id,
                    exc,
                )
    outcome = write_outcome(
        out, base, vectors, record, charge, a1111_pt=args.a1111_pt, ledger=ledger
    )
    _report_release(args, outcome, f"DP-SGD, {config.steps} steps")
    if args.preview:
        from .preview import preview_grid

        print(f"preview: {preview_grid(trainer.model, outcome.path, outcome.name)}")
    return 0


class _DpsgdReused(Exception):
    """Raised from ``before_noise`` to stop training: an identical request is already complete."""


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
    if _distributed_world() > 1:
        raise DpaggError(
            "--method dpsgd runs in one process: launch it without torchrun (WORLD_SIZE > 1)"
        )


def _dpsgd_model_fingerprint(model: Any) -> str:
    """sha256 over the UNet and VAE (parameter names, shapes, dtypes and 16 evenly spaced
    values of each) and the scheduler config: tells models apart for the ledger's idempotency
    key without hashing gigabytes (the text encoders are in ``base_model_id``)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    pipe = model.pipe
    for part in ("unet", "vae"):
        for name, t in getattr(pipe, part).state_dict().items():
            flat = t.detach().reshape(-1)
            idx = torch.linspace(0, max(flat.numel() - 1, 0), min(16, flat.numel())).long()
            sample = flat[idx.to(flat.device)].to("cpu", torch.float64).numpy().tobytes()
            h.update(f"{part}.{name}:{tuple(t.shape)}:{t.dtype}:".encode() + sample)
    h.update(json.dumps(dict(pipe.scheduler.config), sort_keys=True, default=str).encode())
    return h.hexdigest()


def _dpsgd_request(config: Any, model: Any) -> dict[str, Any]:
    """Everything besides the images, plan, C_g, name and base model id that determines a DP-SGD
    release: the ledger hashes it into the request key (``ledger.charge_key``)."""
    import dataclasses

    from .dpsgd import METHOD

    return {
        "method": METHOD,
        "config": json.loads(json.dumps(dataclasses.asdict(config))),
        "family": model.family,
        "prediction_type": model.prediction_type,
        "model": _dpsgd_model_fingerprint(model),
    }


def _dpsgd_unflat(vector: Any, centre: dict[str, Any]) -> dict[str, Any]:
    """A stored flat DP-SGD release back to ``{key: float32 [v, dim]}`` (shapes of the public
    centre, keys in training order)."""
    import numpy as np
    import torch

    arr = np.asarray(vector, dtype=np.float64).reshape(-1)
    out, start = {}, 0
    for k, c in centre.items():
        size = int(c.numel())
        out[k] = torch.from_numpy(arr[start : start + size].reshape(tuple(c.shape))).float()
        start += size
    if start != arr.size:
        raise DpaggError(
            f"the stored DP-SGD release has {arr.size} values but this model and --vectors need "
            f"{start}; the ledger row does not match this request"
        )
    return out


def cmd_suggest_clip_norm(args: argparse.Namespace) -> int:
    import numpy as np

    trainer = _Trainer(args)
    eset = trainer.train(trainer.images(args.public_images))
    centre = eset.flat_centre()
    flat = eset.flat()
    dists = np.linalg.norm(flat - (0 if centre is None else centre), axis=1)
    c = float(np.quantile(dists, args.quantile))
    # The C the public-mean centre (--centre public_mean) needs: same quantile rule, distances
    # of the same PUBLIC embeddings to their own mean.
    to_mean = np.linalg.norm(flat - flat.mean(axis=0), axis=1)
    c_mean = float(np.quantile(to_mean, args.quantile))
    payload = {
        "clip_norm": c,
        "clip_norm_public_mean": c_mean,
        "quantile": args.quantile,
        "n_public": int(eset.n),
        "distances": {
            "min": float(dists.min()),
            "median": float(np.median(dists)),
            "max": float(dists.max()),
        },
    }
    text = (
        f"suggested --clip-norm {c:.4g} (the {args.quantile:.0%} quantile of {eset.n} PUBLIC "
        f"images' distances to the initializer centre; median {np.median(dists):.4g}).\n"
        f"With --centre public_mean (the mean of these images' embeddings as the centre): "
        f"--clip-norm {c_mean:.4g}.\n"
        "Use the same model, initializer, vectors and TI settings for the private run."
    )
    _emit(args, payload, text)
    return 0


def cmd_public_basis(args: argparse.Namespace) -> int:
    """``dpagg public-basis``: a PUBLIC basis for ``--basis`` (``dpagg_core.subspace``), from the
    model's token table or from per-image TI embeddings of PUBLIC images."""
    from .subspace import PublicBasis, save_basis, train_public_embeddings

    if args.kind == "public_embeddings":
        if args.public_images is None:
            raise DpaggError("--kind public_embeddings needs --public-images DIR (PUBLIC images)")
        trainer = _Trainer(args)
        loaded = trainer.images(args.public_images)
        update, close = _progress_bar(f"per-image TI of {loaded.count} PUBLIC images")
        try:
            public = train_public_embeddings(
                trainer.backend, loaded.pixels, trainer.config, progress=update
            )
        finally:
            close()
        basis = PublicBasis.from_public_embeddings(public, args.k)
        if args.save_public_embeddings is not None:
            from .subspace import save_public_embeddings

            save_public_embeddings(public, args.save_public_embeddings)
    else:
        if args.public_images is not None or args.save_public_embeddings is not None:
            raise DpaggError(
                "--public-images/--save-public-embeddings are for --kind public_embeddings"
            )
        from .models import _text_encoders, load_pipeline

        model = load_pipeline(args.model, family=args.family, device="cpu")
        basis = PublicBasis.from_token_table(
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
    _emit(args, payload, text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


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
    p.add_argument("--quantile", type=float, default=0.9)
    p.set_defaults(func=cmd_suggest_clip_norm)

    p = sub.add_parser("public-basis", parents=[common], help="a PUBLIC subspace basis for --basis")
    _add_train_args(p)
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
    p.add_argument("--k", type=int, default=8, help="directions per vector (public; default 8)")
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
