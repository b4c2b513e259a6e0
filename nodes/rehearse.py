"""The **Rehearse** node: the release on PUBLIC pictures, to see what n, epsilon and the recipe
give before a private picture is touched (issue 21 item 1; ``dpagg_core.rehearsal``, the core
of ``dpagg rehearse`` and the WebUI's rehearsal section).

Load Public Images (a folder of a style like yours) -> Per-Image TI -> Rehearse draws n of the
pictures (a public seed), trains them, and writes the non-private mean and ``draws`` private
releases at half, the plan's and double the epsilon into ``models/embeddings/dpagg_rehearsal/``.
Its ``prompts`` output is a LIST (ComfyUI runs the nodes after it once per item): without the
embedding, the non-private mean, then each epsilon, so one KSampler -> Preview Image renders the
grid the CLI draws; ``labels`` names each picture in the same order, and the node shows the
forecast and how far each draw lands from the non-private mean.

Privacy: public pictures only (``nodes/public_style.public_job``: a job of private pictures is
refused; Load Public Images refused any picture the ledger knows as private). The mechanism is
called without the ledger, which is right only because nothing here is private; the files say
``rehearsal`` in their record and live in their own folder, apart from released embeddings."""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from dpagg_core.aggregate.release import CENTRES
from dpagg_core.errors import DpaggError
from dpagg_core.io.names import sanitize_name
from dpagg_core.options import POSTPROCESS
from dpagg_core.privacy import calibration
from dpagg_core.privacy.accountant import PrivacyPlan
from dpagg_core.privacy.mechanism import CLIP_MODES, check_clip_norm
from dpagg_core.rehearsal import pick_public, rehearsal_epsilons, rehearse_set

from .common import (
    CATEGORY,
    DpPlanIO,
    EmbeddingSetIO,
    PublicBasisIO,
    PublicEmbeddingsIO,
    _stage_reporter,
    _ui,
    clip_norm_input,
    comfy_ledger,
    embeddings_dir,
)
from .dp_aggregate import public_centre_input
from .public_style import public_job

REHEARSAL_SUBDIR = "dpagg_rehearsal"


class Rehearse(io.ComfyNode):
    """A rehearsal of the release on n PUBLIC pictures: nothing spent, nothing recorded."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DpaggRehearse",
            display_name="Rehearse on Public Images (dpagg)",
            category=CATEGORY,
            description=(
                "Before spending anything: runs the release on n PUBLIC pictures of a similar "
                "style (Load Public Images -> Per-Image TI) with the plan's rules at half, the "
                "plan's and double its epsilon, several noise draws each, and outputs the "
                "prompts to render them side by side with the non-private mean and the model "
                "without an embedding. Shows the forecast. Nothing is spent or recorded."
            ),
            inputs=[
                EmbeddingSetIO.Input(
                    "public_embedding_set",
                    tooltip="Per-Image TI of Load Public Images (a style like yours; at least "
                    "n pictures)",
                ),
                DpPlanIO.Input("plan", tooltip="the Privacy Accountant's plan for your release"),
                io.Int.Input(
                    "n",
                    default=0,
                    min=0,
                    max=100000,
                    tooltip="images drawn from the public folder: 0 = the plan's n (your "
                    "private set's size)",
                ),
                clip_norm_input("C, as on DP Aggregate (link Public Style's clip_norm)"),
                io.Combo.Input("centre", options=list(CENTRES), default="initializer"),
                io.Int.Input("draws", default=2, min=1, max=8, tooltip="noise draws per epsilon"),
                io.Int.Input(
                    "pick_seed",
                    default=0,
                    min=0,
                    max=2**31 - 1,
                    control_after_generate=False,
                    tooltip="which n public pictures are drawn (public)",
                ),
                io.String.Input("name", default="rehearsal", tooltip="folder name of the files"),
                io.Combo.Input("mode", options=list(CLIP_MODES), default="clip"),
                PublicBasisIO.Input("basis", optional=True, tooltip="as on DP Aggregate"),
                PublicEmbeddingsIO.Input(
                    "public_embeddings",
                    optional=True,
                    tooltip="for centre=public_mean: Public Style's PUBLIC_EMBEDDINGS",
                ),
                io.Combo.Input(
                    "postprocess", options=list(POSTPROCESS), default="none", optional=True
                ),
            ],
            outputs=[
                io.String.Output(
                    display_name="prompts",
                    is_output_list=True,
                    tooltip="one prompt fragment per picture of the grid ('' = no embedding)",
                ),
                io.String.Output(display_name="labels", is_output_list=True),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, **kwargs: Any) -> bool | str:
        try:
            sanitize_name(str(kwargs.get("name", "rehearsal")))
            if kwargs.get("clip_norm") is not None:  # a linked C arrives in execute
                check_clip_norm(float(kwargs["clip_norm"]))
        except (DpaggError, TypeError, ValueError) as exc:
            return str(exc)
        return True

    @classmethod
    def execute(
        cls,
        public_embedding_set,
        plan,
        n,
        clip_norm,
        centre,
        draws,
        pick_seed,
        name,
        mode,
        basis=None,
        public_embeddings=None,
        postprocess="none",
    ) -> io.NodeOutput:
        job = public_job(public_embedding_set, "public_embedding_set")
        if not isinstance(plan, PrivacyPlan):
            raise DpaggError("plan: connect a Privacy Accountant")
        check_clip_norm(float(clip_norm))
        count = int(n) or int(plan.n)
        epsilons = rehearsal_epsilons(float(plan.epsilon))
        plans = {e: calibration.at_epsilon(plan, e, count) for e in epsilons}
        public_centre = public_centre_input(centre, public_embeddings, "")
        rows = pick_public(job.n, count, int(pick_seed))
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        _stage_reporter(node_id, "Rehearse")(f"training {count} of {job.n} PUBLIC pictures")
        eset = job.subset(rows).materialize(node_id)
        rho, source = None, "measured on the drawn public pictures"
        if public_embeddings is not None:  # linked only with centre=public_mean (checked above)
            rho = public_embeddings.agreement(float(clip_norm), str(centre), basis)
            source = "measured on Public Style's images"
        out = embeddings_dir() / REHEARSAL_SUBDIR
        result = rehearse_set(
            eset,
            plans=plans,
            epsilon=float(plan.epsilon),
            clip_norm=float(clip_norm),
            out_dir=out,
            name=str(name),
            centre=str(centre),
            public_centre=public_centre,
            basis=basis,
            mode=str(mode),
            postprocess=str(postprocess or "none"),
            draws=int(draws),
            ledger=comfy_ledger(),
            available=job.n,
            rho=rho,
            rho_source=source,
        )
        prompts, labels = grid_prompts(result, out)
        lines = result.text().splitlines()
        lines.append("pictures (in the prompts' order): " + "; ".join(labels))
        ui = _ui(
            "Rehearse",
            lines,
            result.forecast.verdict != "clear",
            rehearsal=result.summary(),
            labels=labels,
        )
        return io.NodeOutput(prompts, labels, ui=ui)


def grid_prompts(result: Any, out: Any) -> tuple[list[str], list[str]]:
    """(prompt fragments, labels) of the grid: without, non-private, then every draw of every
    epsilon (``embedding:dpagg_rehearsal/<folder>/<file>``, the names ComfyUI's loader finds)."""

    def ref(path: Any) -> str:
        rel = path.relative_to(out.parent).with_suffix("")
        return f"embedding:{rel.as_posix()}"

    prompts, labels = ["", ref(result.mean_file)], ["without embedding", "non-private mean"]
    for e, plan in result.plans.items():
        for d, path in enumerate(result.files[e]):
            prompts.append(ref(path))
            labels.append(f"epsilon {plan.epsilon:.3g}, draw {d + 1}")
    return prompts, labels
