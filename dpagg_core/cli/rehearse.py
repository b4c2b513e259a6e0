"""``dpagg rehearse``: the release pipeline on PUBLIC images (``dpagg_core.rehearsal``)."""

from __future__ import annotations

import argparse
from functools import partial

from dpagg_core.cli.common import (
    add_ledger_args,
    add_mechanism_args,
    add_plan_args,
    add_train_args,
    emit,
    ledger_of,
    plan_of,
    public_centre,
    require_clip_norm,
    trainer_of,
    user_path,
)


def add_rehearse_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "rehearse",
        parents=[common],
        help="see what n and epsilon give, on PUBLIC images (nothing spent)",
    )
    add_train_args(p, private_images=False)
    add_plan_args(p, allow_noise=False)
    add_mechanism_args(p)
    add_ledger_args(p)  # pictures it records as private are refused
    g = p.add_argument_group("rehearsal")
    g.add_argument(
        "--public-images",
        type=user_path,
        required=True,
        help="PUBLIC images of a style like yours (at least --n of them)",
    )
    g.add_argument("--n", type=int, required=True, help="the size of your private set")
    g.add_argument("--draws", type=int, default=2, help="fresh noise draws per epsilon")
    g.add_argument("--out-dir", type=user_path, default=user_path("dpagg-rehearsal"))
    g.add_argument("--name", default="rehearsal", help="sub-folder of --out-dir for this run")
    g.add_argument("--no-grid", action="store_true", help="skip rendering the picture grid")
    g.add_argument("--preview-steps", type=int, default=20, help="sampling steps of the grid")
    p.set_defaults(func=cmd_rehearse)


def cmd_rehearse(args: argparse.Namespace) -> int:
    from dpagg_core.rehearsal import rehearse
    from dpagg_core.showcase.preview import grid_of_embeddings

    clip_norm = require_clip_norm(args)
    plan_of(args, args.n)  # the plan's errors (and a delta warning) before anything loads

    def plan_for(epsilon: float, n: int):
        return plan_of(argparse.Namespace(**{**vars(args), "epsilon": epsilon}), n, warn=False)

    trainer = trainer_of(args)
    basis = trainer.basis(args.basis) if args.basis is not None else None
    render = None
    if not args.no_grid:
        render = partial(grid_of_embeddings, trainer.model, steps=args.preview_steps)
    result = rehearse(
        trainer,
        args.public_images,
        n=args.n,
        plan_for=plan_for,
        epsilon=args.epsilon,
        clip_norm=clip_norm,
        out_dir=args.out_dir,
        name=args.name,
        centre=args.centre,
        public_centre=public_centre(args),
        basis=basis,
        mode=args.clip_mode,
        postprocess=args.postprocess,
        draws=args.draws,
        seed=args.seed,
        render=render,
        ledger=ledger_of(args),
    )
    emit(args, result.summary(), result.text())
    return 0
