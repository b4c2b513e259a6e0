"""``dpagg ledger``, ``audit``, ``inspect`` and ``demo``: reading the ledger and released files,
the empirical audit of the mechanism, and the offline demo."""

from __future__ import annotations

import argparse
import dataclasses
import json

from dpagg_core.cli.common import emit, ledger_of, plan_of


def cmd_ledger(args: argparse.Namespace) -> int:
    ledger = ledger_of(args)
    if args.ledger_cmd == "set-budget":
        status = ledger.set_budget(args.dataset, args.epsilon, args.delta)
        emit(args, status, f"budget of {args.dataset} set: {json.dumps(status, default=str)}")
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
    emit(
        args,
        {"ledger": str(ledger.path), "datasets": statuses, "releases": releases},
        "\n".join(lines),
    )
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from dpagg_core.privacy.audit import audit

    plan = plan_of(args, args.n, warn=False)  # an audit releases nothing
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
    emit(args, payload, result.summary())
    return 0 if result.passed else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from dpagg_core.budget_report import describe_text
    from dpagg_core.io.released_file import describe

    info = describe(args.file)
    emit(args, info, describe_text(args.file, info))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dpagg_core.showcase.demo import run_demo

    return run_demo(args.out_dir, aggregation_only=args.aggregation_only, as_json=args.json)
