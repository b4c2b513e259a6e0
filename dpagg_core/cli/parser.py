"""The ``dpagg`` argument parser (:func:`build_parser`) and entry point (:func:`main`)."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence

from dpagg_core import __version__, options
from dpagg_core.cli.common import (
    add_ledger_args,
    add_plan_args,
    add_release_args,
    add_train_args,
    user_path,
)
from dpagg_core.cli.public import cmd_public_basis, cmd_suggest_clip_norm, k_arg
from dpagg_core.cli.records import cmd_audit, cmd_demo, cmd_inspect, cmd_ledger
from dpagg_core.cli.rehearse import add_rehearse_parser
from dpagg_core.cli.release import cmd_account, cmd_aggregate, cmd_run, cmd_train
from dpagg_core.errors import DpaggError


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
    add_plan_args(p)
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
    p.add_argument(
        "--rho",
        type=float,
        default=None,
        help="the forecast's agreement of public per-image deltas of one style (0-1; default "
        "0.37, measured on public styles: docs/evidence.md)",
    )
    p.set_defaults(func=cmd_account)

    p = sub.add_parser(
        "aggregate", parents=[common], help="release a DP mean of a private embedding set"
    )
    p.add_argument("--embeddings", type=user_path, required=True, help="private embedding set file")
    add_plan_args(p, allow_noise=False)
    add_release_args(p)
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("train", parents=[common], help="per-image textual inversion")
    add_train_args(p)
    add_ledger_args(p)  # its key ids the image set (and authenticates the private file)
    p.add_argument(
        "--keep-private-embeddings",
        type=user_path,
        help="write the PRIVATE per-image embeddings to this file (a warning is printed)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", parents=[common], help="train per image, then release privately")
    add_train_args(p)
    add_plan_args(p, allow_noise=False)
    add_release_args(p)
    p.add_argument("--method", choices=options.METHODS, default="ti")
    p.add_argument("--preview", action="store_true", help="also render a small preview grid")
    g = p.add_argument_group("DP-SGD baseline (--method dpsgd; --steps, --learning-rate apply)")
    g.add_argument(
        "--expected-batch", type=float, help="expected Poisson batch size qn (default 8)"
    )
    g.add_argument(
        "--grad-clip-norm", type=float, help="per-example gradient clip C_g (default 1e-3)"
    )
    g.add_argument("--optimizer", choices=options.OPTIMIZERS, help="default adam")
    p.set_defaults(func=cmd_run)

    add_rehearse_parser(sub, common)

    p = sub.add_parser("suggest-clip-norm", parents=[common], help="pick C from PUBLIC images")
    add_train_args(p, private_images=False)
    p.add_argument("--public-images", type=user_path, required=True, help="PUBLIC images only")
    add_ledger_args(p)  # pictures it records as private are refused
    p.add_argument("--quantile", type=float, default=0.9)
    p.set_defaults(func=cmd_suggest_clip_norm)

    p = sub.add_parser("public-basis", parents=[common], help="a PUBLIC subspace basis for --basis")
    add_train_args(p, private_images=False)
    add_ledger_args(p)  # pictures it records as private are refused; it keys the file's tag
    p.add_argument(
        "--kind",
        choices=options.BASIS_KINDS,
        default="public_embeddings",
        help="PCA of the model's token table, or of TI embeddings of --public-images",
    )
    p.add_argument("--public-images", type=user_path, default=None, help="PUBLIC images only")
    p.add_argument(
        "--k",
        type=k_arg,
        default=8,
        help="directions per vector (public; default 8), or 'auto': the smallest of 4, 8, 12, "
        "16, 24, 32, 48, 64, ... whose mean cosine to a held-out public style's mean is >= 0.95 "
        "(--public-images then holds >= 3 subfolders, one per public style)",
    )
    p.add_argument("--out", type=user_path, required=True, help="basis file (.safetensors)")
    p.add_argument(
        "--save-public-embeddings",
        type=user_path,
        default=None,
        help="also write the PUBLIC per-image embeddings (for --centre public_mean)",
    )
    p.set_defaults(func=cmd_public_basis)

    p = sub.add_parser("audit", parents=[common], help="empirical privacy audit of the mechanism")
    add_plan_args(p)
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
        type=user_path,
        default=None,
        help="audit the projected mechanism (a basis file)",
    )
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("ledger", parents=[common], help="show the ledger or set a budget")
    lsub = p.add_subparsers(dest="ledger_cmd", required=True)
    ls = lsub.add_parser("show", parents=[common], help="budgets and releases")
    ls.add_argument("--dataset", default=None)
    add_ledger_args(ls)
    lb = lsub.add_parser("set-budget", parents=[common], help="set or raise a dataset's budget")
    lb.add_argument("--dataset", required=True)
    lb.add_argument("--epsilon", type=float, required=True)
    lb.add_argument("--delta", type=float, required=True)
    add_ledger_args(lb)
    p.set_defaults(func=cmd_ledger)

    p = sub.add_parser("inspect", parents=[common], help="print a released file's privacy record")
    p.add_argument("file", type=user_path)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", parents=[common], help="end-to-end demo on a tiny offline model")
    p.add_argument("--out-dir", type=user_path, default=None, help="where to write (default: temp)")
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
