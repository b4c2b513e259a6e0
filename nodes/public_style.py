"""The **Public Style** node: the small-set recipe built inside the graph from PUBLIC pictures
(issue 21 item 3): Load Public Images -> Per-Image TI -> Public Style gives DP Aggregate its
public basis (k chosen by leaving one public style out), its public-mean centre and its clip
norm C, exactly what ``dpagg public-basis --k auto`` gives the CLI
(``dpagg_core.training.public.style_from_public``).

Privacy (docs/privacy.md invariants 2 and 8): everything here comes from PUBLIC pictures; a
Per-Image TI job of private pictures is refused, and Load Public Images refused any picture the
ledger knows as private. The public embeddings are kept on disk (the pack's user folder) keyed
by the model, the TI settings and the pictures, so that the same graph gives the same centre,
basis and C after a restart and an identical release is answered from the ledger instead of
being charged again (``training.public.cached_public_embeddings``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from comfy_api.latest import io

from dpagg_core.aggregate.basis_choice import subspace_clip_norms
from dpagg_core.errors import DpaggError
from dpagg_core.training.public import PublicBasisBuild, style_from_public

from .common import (
    CATEGORY,
    EmbeddingSetIO,
    PublicBasisIO,
    PublicEmbeddingsIO,
    _first,
    _ui,
    comfy_ledger,
    ledger_path,
)
from .per_image_ti import TrainingJob
from .public_basis import basis_lines

PUBLIC_CACHE_SUBDIR = "public_embeddings"


def public_job(value: Any, where: str) -> TrainingJob:
    """The Per-Image TI job of Load Public Images linked to ``where``; anything else refused."""
    job = _first(value)
    if not isinstance(job, TrainingJob) or job.public is None:
        raise DpaggError(
            f"{where}: connect the Per-Image TI of a Load Public Images node (PUBLIC pictures "
            "only: a basis, centre or C from the private images would not be private, "
            "docs/privacy.md invariant 8)"
        )
    return job


def public_embeddings_of(job: TrainingJob, node_id: Any) -> tuple[Any, bool]:
    """(PublicEmbeddings, from_cache) of a public job, cached in the pack's user folder."""
    ledger = comfy_ledger()
    return job.public_embeddings(ledger_path().parent / PUBLIC_CACHE_SUBDIR, ledger, node_id)


def k_choice_line(choice: Any) -> str:
    """How k was chosen, in one line (public values only)."""
    row = next(r for r in choice.rows if r["k"] == choice.k)
    met = "reached" if choice.met else "no k reached"
    return (
        f"k = {choice.k} per vector, chosen on {choice.groups} PUBLIC styles by leaving one out "
        f"(mean cosine {row['cos_mean']:.3f}; {met} {choice.min_cos:g})"
    )


class PublicStyle(io.ComfyNode):
    """The public basis, public-mean centre and C for DP Aggregate, from PUBLIC pictures."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DpaggPublicStyle",
            display_name="Public Style (dpagg)",
            category=CATEGORY,
            description=(
                "The small-set recipe from PUBLIC pictures of a similar style (Load Public "
                "Images -> Per-Image TI -> here): a public basis (DP Aggregate then adds noise "
                "on K instead of all coordinates), the public embeddings whose mean is the "
                "centre (DP Aggregate centre=public_mean) and the clip norm C around it. "
                "Nothing private enters; nothing is spent."
            ),
            inputs=[
                EmbeddingSetIO.Input(
                    "public_embedding_set",
                    tooltip="Per-Image TI of Load Public Images (same model and TI settings as "
                    "the private set's Per-Image TI)",
                ),
                io.Int.Input(
                    "k",
                    default=0,
                    min=0,
                    max=1280,
                    tooltip="directions per vector; 0 = auto: chosen by leaving one public "
                    "style out (the folder needs >= 3 style subfolders)",
                ),
                io.Float.Input(
                    "clip_quantile",
                    default=0.5,
                    min=0.01,
                    max=1.0,
                    step=0.01,
                    tooltip="C is this quantile of the public embeddings' distances from their "
                    "mean, in the basis (0.5: the median)",
                ),
            ],
            outputs=[
                PublicBasisIO.Output(display_name="PUBLIC_BASIS"),
                PublicEmbeddingsIO.Output(display_name="PUBLIC_EMBEDDINGS"),
                io.Float.Output(display_name="clip_norm"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, public_embedding_set, k, clip_quantile) -> io.NodeOutput:
        job = public_job(public_embedding_set, "public_embedding_set")
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        public, cached = public_embeddings_of(job, node_id)
        build: PublicBasisBuild = dataclasses.replace(
            style_from_public(public, int(k) or "auto", job.public.groups, job.public.styles),
            ti_config=job.config,
        )
        basis = build.basis
        clip_norm = float(subspace_clip_norms(public, basis, float(clip_quantile))["public_mean"])
        rho = build.agreement(clip_norm, "public_mean", basis)
        how = "from the cache (trained before, same model and settings)" if cached else "trained"
        lines = [
            f"{public.n} PUBLIC images in {len(build.styles)} style(s): embeddings {how}",
            k_choice_line(build.choice) if build.choice is not None else f"k = {basis.k} (given)",
            *basis_lines(basis),
            f"centre: the mean of the {public.n} public embeddings (DP Aggregate "
            "centre=public_mean)",
            f"clip_norm C = {clip_norm:.4g}: quantile {float(clip_quantile):g} of their distances "
            "from that mean in the basis",
            f"agreement rho = {rho:.2f} on these public styles (DP Aggregate's forecast uses it)",
        ]
        ui = _ui(
            "Public Style",
            lines,
            k=int(basis.k),
            K=int(basis.dim),
            clip_norm=clip_norm,
            rho=rho,
            cached=cached,
        )
        return io.NodeOutput(basis, build, clip_norm, ui=ui)
