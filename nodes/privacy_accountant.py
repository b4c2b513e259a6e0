"""The **Privacy Accountant** node: the plan of its widgets (``calibration.plan_from_inputs``,
the CLI's), checked against the image set's budget as the DP Aggregate it feeds will check it."""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from dpagg_core.budget_report import plan_lines
from dpagg_core.errors import DpaggError
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.privacy import accountant, calibration
from dpagg_core.privacy.accountant import SAMPLINGS
from dpagg_core.privacy.forecast import forecast

from .budget_status import budget_block, budget_query
from .common import (
    CATEGORY,
    MODE_NOISE,
    MODE_TARGET,
    DpPlanIO,
    EmbeddingSetIO,
    _opt,
    _ui,
    comfy_ledger,
)
from .per_image_ti import TrainingJob, refuse_public


def aggregate_budgets(hidden: Any) -> list[tuple[str, float | None, float | None]]:
    """(node id, budget_epsilon, budget_delta) of every DP Aggregate in the queued prompt that
    takes its plan from this node (``hidden.prompt``/``unique_id``: the API prompt, public
    widget values), so the Privacy Accountant checks the plan against the same budget."""
    prompt = getattr(hidden, "prompt", None) or {}
    me = str(getattr(hidden, "unique_id", None))
    out = []
    for node_id, node in prompt.items() if isinstance(prompt, dict) else ():
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        link = inputs.get("plan")
        if node.get("class_type") != "DpaggAggregate" or not isinstance(link, list):
            continue
        be, bd = inputs.get("budget_epsilon", 0.0), inputs.get("budget_delta", 0.0)
        if str(link[0]) == me and all(isinstance(v, (int, float)) for v in (be, bd)):
            out.append((str(node_id), _opt(be), _opt(bd)))
    return out


def plan_arguments(kw: dict[str, Any], n: int | None = None) -> dict[str, Any]:
    """The Privacy Accountant's widgets as the keyword arguments of the core's
    ``calibration.plan_from_inputs`` / ``check_inputs`` (``n`` replaces the widget's n)."""
    target = kw["mode"] == MODE_TARGET
    return {
        "n": int(kw["n"]) if n is None else int(n),
        "delta": float(kw["delta"]),
        "epsilon": float(kw["epsilon"]) if target else None,
        "noise_multiplier": None if target else float(kw["noise_multiplier"]),
        "sampling": kw["sampling"],
        "m": int(kw["m"]),
        "q": float(kw["q"]),
        "releases": int(kw["releases"]),
    }


def accountant_problems(kw: dict[str, Any], n_known: bool) -> str | None:
    """Cheap checks of the accountant's widgets, before anything runs (None if fine): the core's
    ``calibration.check_inputs`` (a plan's own rules), those that involve n only when n is the
    widget's (``n_known``), not the linked set's."""
    mode = kw.get("mode")
    if mode not in (MODE_TARGET, MODE_NOISE):
        return f"mode={mode!r}: use {MODE_TARGET!r} or {MODE_NOISE!r}"
    try:
        args = plan_arguments(kw)
    except (KeyError, TypeError, ValueError) as exc:
        return f"bad or missing parameter: {exc}"
    try:
        calibration.check_inputs(**args, n_known=n_known)
    except DpaggError as exc:
        return str(exc)
    return None


class PrivacyAccountant(io.ComfyNode):
    """Noise <-> epsilon for a planned release (dp-accounting), as a DP_PLAN."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DpaggPrivacyAccountant",
            display_name="Privacy Accountant (dpagg)",
            category=CATEGORY,
            description=(
                "Plans a DP release: the least noise for a target epsilon, or the epsilon of a "
                "given noise multiplier. n comes from the EMBEDDING_SET when connected. With a "
                "set connected it checks the plan against the image set's budget as the DP "
                "Aggregate it feeds will (same ledger, same budget_epsilon/budget_delta)."
            ),
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
            inputs=[
                io.Combo.Input("mode", options=[MODE_TARGET, MODE_NOISE], default=MODE_TARGET),
                io.Float.Input(
                    "epsilon", default=4.0, min=0.001, max=1000.0, step=0.1, tooltip="target"
                ),
                io.Float.Input(
                    "noise_multiplier",
                    default=1.0,
                    min=0.001,
                    max=10000.0,
                    step=0.01,
                    tooltip="noise std / L2 sensitivity (used in the noise -> epsilon mode)",
                ),
                io.Float.Input(
                    "delta",
                    default=accountant.DEFAULT_DELTA,
                    min=1e-12,
                    max=0.5,
                    step=1e-6,
                    round=False,
                    tooltip="probability that the guarantee may fail outright; keep the default "
                    "1e-5 (a larger delta is shown as a warning on this node)",
                ),
                io.Int.Input(
                    "n", default=8, min=1, max=10**9, tooltip="used when no set is connected"
                ),
                io.Combo.Input("sampling", options=list(SAMPLINGS), default="full"),
                io.Int.Input("m", default=4, min=1, max=10**9, tooltip="sample size (wor)"),
                io.Float.Input(
                    "q",
                    default=0.5,
                    min=1e-6,
                    max=1.0,
                    step=0.01,
                    round=False,
                    tooltip="sampling rate (poisson)",
                ),
                io.Int.Input("releases", default=1, min=1, max=10**6),
                EmbeddingSetIO.Input("embedding_set", optional=True),
            ],
            outputs=[
                DpPlanIO.Output(display_name="DP_PLAN"),
                io.String.Output(display_name="summary"),
            ],
        )

    @classmethod
    def validate_inputs(cls, **kwargs: Any) -> bool | str:
        problem = accountant_problems(kwargs, n_known="embedding_set" not in kwargs)
        return True if problem is None else problem

    @classmethod
    def execute(
        cls,
        mode,
        epsilon,
        noise_multiplier,
        delta,
        n,
        sampling,
        m,
        q,
        releases,
        embedding_set=None,
    ) -> io.NodeOutput:
        refuse_public(embedding_set, "embedding_set")
        linked = isinstance(embedding_set, (EmbeddingSet, TrainingJob))  # n, id: no training
        n_eff = embedding_set.n if linked else int(n)
        widgets = dict(mode=mode, epsilon=epsilon, noise_multiplier=noise_multiplier, n=n)
        widgets.update(delta=delta, sampling=sampling, m=m, q=q, releases=releases)
        plan = calibration.plan_from_inputs(**plan_arguments(widgets, n_eff))
        summary = accountant.plan_summary(plan)
        lines = plan_lines(plan)
        outlook = forecast(plan)  # the recipe's K and agreement: no basis or public images here
        lines.append(f"{outlook.text()} (DP Aggregate: for its own basis and public images)")
        delta_warning = accountant.delta_warning(plan.delta, n_eff)
        if delta_warning:
            lines = [f"WARNING: {delta_warning}", *lines]
            summary = f"WARNING: {delta_warning}\n{summary}"
        if linked:  # the n widget is hidden while a set is connected (js/dpagg.js)
            lines.insert(0, f"n = {n_eff}, from the connected image set")
        warning = delta_warning is not None
        figures: dict[str, Any] = {"delta_warning": delta_warning, "own_warning": warning}
        figures["forecast"] = outlook.to_dict()
        figures["n_from_set"] = n_eff if linked else None  # js/dpagg.js shows it on `n`
        if linked and embedding_set.dataset_id:
            # the budget lines: what the next release can be and each DP Aggregate's own check
            # (a dry run), re-read by js/dpagg.js after any release (nodes/budget_status.py)
            targets = aggregate_budgets(cls.hidden)
            query = budget_query(embedding_set.dataset_id, plan, targets, refusals=True)
            more, over, budget_figures = budget_block(comfy_ledger(), query)
            lines += more
            warning = warning or over
            figures.update(budget_figures, budget_lines=more, budget_query=query)
        return io.NodeOutput(
            plan,
            summary,
            ui=_ui("Privacy Accountant", lines, warning, plan=plan.to_dict(), **figures),
        )
