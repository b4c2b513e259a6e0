"""``dpagg suggest-clip-norm`` and ``dpagg public-basis``: what is computed from PUBLIC images
(or the model's token table) for a release: the clip norm C, a basis and its k."""

from __future__ import annotations

import argparse
from typing import Any

from dpagg_core.cli.common import emit, ledger_of, trainer_of
from dpagg_core.errors import DpaggError


def cmd_suggest_clip_norm(args: argparse.Namespace) -> int:
    from dpagg_core.privacy.mechanism import suggest_clip_norm

    trainer = trainer_of(args)
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
    emit(args, payload, text)
    return 0


def k_arg(text: str) -> int | str:
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
    from dpagg_core.aggregate.basis_builders import basis_from_token_table, save_basis

    choice, styles, clip_norms = None, None, None
    if args.kind == "public_embeddings":
        if args.public_images is None:
            raise DpaggError("--kind public_embeddings needs --public-images DIR (PUBLIC images)")
        from dpagg_core.training.public import build_public_basis, public_style_folders
        from dpagg_core.training.train_run import progress_bar

        if args.k == "auto":  # bad style folders: refused before the model loads
            public_style_folders(args.public_images)
        ledger = ledger_of(args)
        update, close = progress_bar("per-image TI of the PUBLIC images")
        try:
            built = build_public_basis(
                trainer_of(args), args.public_images, args.k, ledger=ledger, progress=update
            )
        finally:
            close()
        basis, clip_norms, choice, styles = (
            built.basis,
            built.clip_norms,
            built.choice,
            built.styles,
        )
        if args.save_public_embeddings is not None:
            from dpagg_core.io.public_embeddings import save_public_embeddings

            key = ledger.identity_key()
            save_public_embeddings(built.public, args.save_public_embeddings, key=key)
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
            "groups": list(styles),
            "rows": [dict(r) for r in choice.rows],
        }
        text = _k_choice_text(choice) + "\n" + text
    emit(args, payload, text)
    return 0
