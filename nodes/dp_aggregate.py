"""The **DP Aggregate** node: ONE differentially private mean of an EMBEDDING_SET, recorded in
the ledger before it leaves the mechanism (``aggregate.release.release_embeddings``, or the
pipeline for Per-Image TI's deferred job)."""

from __future__ import annotations

import math
from typing import Any

from comfy_api.latest import io

from dpagg_core.aggregate.release import (
    CENTRES,
    PUBLIC_EMBEDDINGS_HINT,
    check_public_centre_inputs,
    release_embeddings,
)
from dpagg_core.budget_report import (
    budget_request_lines,
    budget_required_message,
    budget_status,
    needs_budget,
    plan_lines,
    release_shaping,
)
from dpagg_core.errors import BudgetExceeded, DpaggError
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.io.names import sanitize_name
from dpagg_core.options import POSTPROCESS
from dpagg_core.paths import resolve_path
from dpagg_core.pipeline import train_and_release
from dpagg_core.privacy.accountant import PrivacyPlan
from dpagg_core.privacy.basis import PublicBasis as CoreBasis
from dpagg_core.privacy.forecast import Forecast, forecast
from dpagg_core.privacy.ledger import Ledger
from dpagg_core.privacy.mechanism import CLIP_MODES, check_clip_norm
from dpagg_core.training.public import PublicBasisBuild

from .budget_status import budget_block, budget_query, notify_ledger_changed
from .common import (
    CATEGORY,
    PUBLIC_MEAN_CENTRE,
    DpPlanIO,
    EmbeddingSetIO,
    PublicBasisIO,
    PublicEmbeddingsIO,
    _opt,
    _stage_reporter,
    _ui,
    clip_norm_input,
    clip_release_dir,
    comfy_ledger,
    embeddings_dir,
)
from .per_image_ti import TrainingJob, refuse_public


class DPAggregate(io.ComfyNode):
    """Release ONE differentially private mean of an EMBEDDING_SET, recorded in the ledger."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DpaggAggregate",
            display_name="DP Aggregate (dpagg)",
            category=CATEGORY,
            description=(
                "Clips every per-image embedding around a public centre, averages them, adds "
                "Gaussian noise from the DP_PLAN and records the release in the privacy ledger "
                "(ComfyUI user folder). Writes models/embeddings/<name>.safetensors under a new "
                "name per release and outputs the exact 'embedding:<name>' text for the prompt."
            ),
            inputs=[
                EmbeddingSetIO.Input("embedding_set"),
                DpPlanIO.Input("plan"),
                clip_norm_input(
                    "C: every embedding is clipped to distance C from the centre. Choose "
                    "it from public data, never from these images",
                ),
                io.Combo.Input(
                    "centre",
                    options=list(CENTRES),
                    default="initializer",
                    tooltip="public centre to clip around: initializer (the initializer token's "
                    "embedding), origin, or public_mean (the mean embedding of PUBLIC images, "
                    "from public_embeddings_file)",
                ),
                io.String.Input("name", default="mystyle", tooltip="base file name"),
                io.Combo.Input("mode", options=list(CLIP_MODES), default="clip"),
                io.Float.Input(
                    "budget_epsilon",
                    default=0.0,
                    min=0.0,
                    max=1000.0,
                    step=0.1,
                    tooltip="the total epsilon this image set may ever spend, all releases "
                    "together: required before its first release (a deliberate choice), then 0 "
                    "keeps the recorded budget (raising it is the Privacy Ledger's dialog)",
                ),
                io.Float.Input(
                    "budget_delta", default=0.0, min=0.0, max=0.5, step=1e-6, round=False
                ),
                PublicBasisIO.Input(
                    "basis",
                    optional=True,
                    tooltip="optional PUBLIC basis (Public Basis node): clip, average and add "
                    "the noise in its k directions per vector instead of all D coordinates",
                ),
                io.Combo.Input(
                    "postprocess",
                    options=list(POSTPROCESS),
                    default="none",
                    optional=True,
                    tooltip="free post-processing of the release (no privacy cost): js = "
                    "James-Stein shrinkage toward the centre; norm = rescale to the basis' "
                    "typical norm",
                ),
                PublicEmbeddingsIO.Input(
                    "public_embeddings",
                    optional=True,
                    tooltip="for centre=public_mean: Public Style's PUBLIC_EMBEDDINGS (their "
                    "mean is the centre; also sets the forecast's agreement). Or give "
                    "public_embeddings_file instead",
                ),
                io.String.Input(
                    "public_embeddings_file",
                    default="",
                    optional=True,
                    tooltip="for centre=public_mean only: a .safetensors file of per-image "
                    "embeddings of PUBLIC images ONLY (never these private images), written by "
                    "`dpagg public-basis --public-images DIR --save-public-embeddings FILE` - "
                    "the same file the CLI's `--centre public_mean --public-embeddings FILE` "
                    "takes. Their mean is the centre; a private file is refused",
                ),
            ],
            hidden=[io.Hidden.unique_id],
            outputs=[
                io.String.Output(display_name="prompt", tooltip="embedding:<name>"),
                io.ClipVisionOutput.Output(
                    display_name="CLIP_VISION_OUTPUT", tooltip="for Clip Embeddings sets"
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, **kwargs: Any) -> bool | str:
        try:
            sanitize_name(str(kwargs.get("name", "")))
        except DpaggError as exc:
            return f"name: {exc}"
        try:  # a linked clip_norm (Public Style's C) is not here yet: execute checks it
            if kwargs.get("clip_norm") is not None:
                check_clip_norm(float(kwargs["clip_norm"]))
        except (DpaggError, TypeError, ValueError) as exc:
            return f"{exc} Choose C from public data, never from these images."
        centre, text = kwargs.get("centre"), str(kwargs.get("public_embeddings_file", "") or "")
        # a linked input arrives here as None (its value exists only at execution); an
        # unlinked optional one is absent
        if not (centre == PUBLIC_MEAN_CENTRE and "public_embeddings" in kwargs):
            problem = check_public_centre_inputs(centre, text)
            if problem:
                return problem
        if kwargs.get("postprocess", "none") not in POSTPROCESS:
            return f"postprocess={kwargs.get('postprocess')!r}: use one of {POSTPROCESS}"
        if kwargs.get("mode") not in CLIP_MODES:
            return f"mode={kwargs.get('mode')!r}: use one of {list(CLIP_MODES)}"
        be, bd = float(kwargs.get("budget_epsilon", 0)), float(kwargs.get("budget_delta", 0))
        if be < 0 or not math.isfinite(be):
            return f"budget_epsilon={be}: use 0 (keep the recorded budget) or a positive number"
        if not 0 <= bd < 1:
            return f"budget_delta={bd}: use 0 (keep the recorded budget) or a number in (0, 1)"
        return True

    @classmethod
    def execute(
        cls,
        embedding_set,
        plan,
        clip_norm,
        centre,
        name,
        mode,
        budget_epsilon,
        budget_delta,
        basis=None,
        postprocess="none",
        public_embeddings=None,
        public_embeddings_file="",
    ) -> io.NodeOutput:
        from comfy_execution.graph_utils import ExecutionBlocker

        if not isinstance(embedding_set, (EmbeddingSet, TrainingJob)):
            raise DpaggError("embedding_set: connect Per-Image TI or Clip Embeddings")
        refuse_public(embedding_set, "embedding_set")
        check_clip_norm(float(clip_norm))
        if not isinstance(plan, PrivacyPlan):
            raise DpaggError("plan: connect a Privacy Accountant")
        if basis is not None and not isinstance(basis, CoreBasis):
            raise DpaggError("basis: connect a Public Basis node (or leave it unconnected)")
        eset = embedding_set
        if plan.n != eset.n:
            raise DpaggError(
                f"the DP_PLAN was made for n={plan.n} images but the EMBEDDING_SET holds "
                f"{eset.n}: connect the set to the Privacy Accountant's embedding_set input (or "
                f"set its n to {eset.n}). Nothing was spent."
            )
        # Checked again here (validate_inputs may be bypassed), before the ledger is touched;
        # release_embeddings loads the file and refuses a private one before reserving.
        public_centre = public_centre_input(centre, public_embeddings, public_embeddings_file)
        is_ti = eset.kind == "textual_inversion"
        ledger = comfy_ledger()
        be, bd = _opt(budget_epsilon), _opt(budget_delta)
        # issue 20 item 10: an image set's first release needs a deliberate budget (the
        # ledger's default, this release's epsilon, would allow that one release only)
        if needs_budget(budget_status(ledger, eset.dataset_id)["budget"], be):
            raise DpaggError(
                budget_required_message(plan.epsilon, "budget_epsilon (on this node)", refused=True)
            )
        options: dict[str, Any] = {
            "clip_norm": float(clip_norm),
            "name": str(name),
            "out_dir": embeddings_dir() if is_ti else clip_release_dir(),
            "centre": str(centre),
            "mode": str(mode),
            "budget_epsilon": be,
            "budget_delta": bd,
            "new_name_per_release": True,
            "basis": basis,
            "postprocess": str(postprocess or "none"),
            "public_centre": public_centre,
        }
        trained: bool | None = None
        changed = True
        try:
            if isinstance(eset, TrainingJob):
                # The pipeline: the ledger's record of the identical request first (nothing
                # trained), else the budget check, the training (this node's progress bar and
                # Interrupt), then the release keyed by the same inputs.
                outcome, trained = _release_job(eset, plan, ledger, cls, options)
            else:
                outcome = release_embeddings(eset, plan=plan, ledger=ledger, **options)
        except BudgetExceeded:
            changed = False  # refused before anything was spent: the ledger is as it was
            raise
        finally:  # every open page re-reads its nodes' budget lines (nodes/budget_status.py)
            if changed:
                notify_ledger_changed(eset.dataset_id)
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        query = budget_query(eset.dataset_id, plan, [(str(node_id or ""), be, bd)])
        more, warning, figures = budget_block(ledger, query)
        state = "reused (nothing spent)" if outcome.reused else "new release"
        lines = [f"{outcome.prompt if is_ti else outcome.name}: {state}"]
        if trained is not None:
            lines.append(
                f"trained {eset.n} per-image embeddings for it"
                if trained
                else "answered from the ledger's record: nothing trained, nothing spent"
            )
            figures["trained"] = trained
        lines += budget_request_lines(figures.get("budget"), be, bd, outcome.reused)
        lines += plan_lines(plan)
        flat_dim = sum(int(t.numel()) for t in outcome.vectors.values())
        if isinstance(public_embeddings, PublicBasisBuild) and isinstance(eset, TrainingJob):
            differ = public_embeddings.settings_differ(eset.config)
            if differ:  # a utility warning (all public settings), not a privacy one
                lines.append(
                    "warning: Public Style's Per-Image TI was trained with other settings ("
                    + "; ".join(differ)
                    + "): its basis, centre and C fit this set best with the same settings"
                )
        if is_ti:
            outlook = release_forecast(
                plan, basis, flat_dim, float(clip_norm), str(centre), public_embeddings
            )
            lines.append(outlook.text())
            figures["forecast"] = outlook.to_dict()
        shaping, extra = release_shaping(outcome.record, plan, float(clip_norm), flat_dim)
        lines += shaping + more  # budget last: js/dpagg.js refreshes them after any release
        figures.update(extra, budget_lines=more, budget_query=query, own_warning=False)
        text = outcome.prompt if is_ti else outcome.name
        if is_ti:
            vision: Any = ExecutionBlocker(
                "DP Aggregate: CLIP_VISION_OUTPUT is only produced for Clip Embeddings sets"
            )
        else:
            from comfy.clip_vision import Output

            vision = Output()
            vision["image_embeds"] = outcome.vectors["image_embeds"].reshape(1, -1).clone()
        ui = _ui(
            "DP Aggregate",
            lines,
            warning,
            name=outcome.name,
            prompt=text,
            reused=outcome.reused,
            plan=plan.to_dict(),
            **figures,
        )
        return io.NodeOutput(text, vision, ui=ui)


def public_centre_input(centre: Any, public_embeddings: Any, public_embeddings_file: Any) -> Any:
    """What ``release_embeddings`` takes as ``public_centre``: Public Style's PUBLIC_EMBEDDINGS
    or the file (exactly one, and only with centre=public_mean); None for the other centres.
    Checked before the ledger is touched (validate_inputs cannot see a linked input)."""
    text = str(public_embeddings_file or "").strip()
    if public_embeddings is not None:
        if not isinstance(public_embeddings, PublicBasisBuild):
            raise DpaggError("public_embeddings: connect a Public Style node's PUBLIC_EMBEDDINGS")
        if centre != PUBLIC_MEAN_CENTRE:
            raise DpaggError(
                f"public_embeddings is linked but centre={centre!r}: choose centre=public_mean "
                "(their mean) or unlink it. Nothing was spent."
            )
        if text:
            raise DpaggError(
                "centre=public_mean has both Public Style's public_embeddings and a "
                "public_embeddings_file: keep one (clear the file). Nothing was spent."
            )
        return public_embeddings.public
    if centre == PUBLIC_MEAN_CENTRE and not text:
        raise DpaggError(
            "centre=public_mean needs the embeddings of PUBLIC images: link Public Style's "
            f"public_embeddings, or give public_embeddings_file ({PUBLIC_EMBEDDINGS_HINT}). "
            "Nothing was spent."
        )
    problem = check_public_centre_inputs(centre, text)
    if problem:
        raise DpaggError(problem)
    return resolve_path(text) if centre == PUBLIC_MEAN_CENTRE else None


def release_forecast(
    plan: PrivacyPlan,
    basis: Any,
    flat_dim: int,
    clip_norm: float,
    centre: str,
    public_embeddings: Any,
) -> Forecast:
    """The forecast line (``privacy.forecast``): K from the basis (else all D coordinates),
    the agreement rho measured on Public Style's PUBLIC embeddings around this centre and in
    this basis when linked, else the documented default. Public inputs only."""
    k = int(basis.dim) if basis is not None else int(flat_dim)
    if not isinstance(public_embeddings, PublicBasisBuild):
        return forecast(plan, k)
    rho = public_embeddings.agreement(clip_norm, centre, basis)
    return forecast(plan, k, max(rho, 1e-6), rho_source="measured on Public Style's images")


def _release_job(
    job: TrainingJob, plan: PrivacyPlan, ledger: Ledger, node: Any, options: dict[str, Any]
) -> tuple[Any, bool]:
    """(outcome, trained) of DP Aggregate on Per-Image TI's deferred job, through the core
    pipeline (``pipeline.train_and_release``): an identical request recorded in the ledger is
    answered from its record and nothing trains."""
    import comfy.model_management

    node_id = getattr(getattr(node, "hidden", None), "unique_id", None)
    before = job.trained_here
    with job.trainer(node_id) as trainer:
        outcome = train_and_release(
            trainer,
            job,
            plan,
            ledger=ledger,
            before_release=comfy.model_management.throw_exception_if_processing_interrupted,
            **options,
        )
    if outcome is None:  # pragma: no cover - torchrun ranks only
        raise DpaggError("internal: the pipeline returned no release")
    trained = job.trained_here > before
    if not trained:
        stage = _stage_reporter(node_id, "DP Aggregate")
        stage(
            "answered from the ledger's record of this request: nothing trained, nothing spent"
            if outcome.reused
            else "released the per-image embeddings Per-Image TI trained before"
        )
    return outcome, trained
