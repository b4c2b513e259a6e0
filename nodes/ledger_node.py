"""Privacy Ledger node: every image set's budget and releases, and raising a budget on an explicit,
confirmed action — the ComfyUI way to do what ``dpagg ledger show`` / ``set-budget`` do (ComfyUI's
install puts no ``dpagg`` command on PATH).

Showing reads public ledger columns only (dataset ids, budgets, spend, release names and
epsilons). Raising a budget needs the dataset id, the new epsilon and a confirmation text that
repeats both (``raise <dataset> to <epsilon>``); anything else changes nothing. Setting a budget
to the same value again (a re-queued workflow) is a no-op, and a budget can never be set below
what is already spent (``Ledger.set_budget`` refuses).
"""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from dpagg_core.budget_report import fmt, ledger_lines
from dpagg_core.errors import DpaggError

from .privacy_nodes import CATEGORY, _ui, comfy_ledger

ACTIONS = ("show", "raise budget")


def confirmation_text(dataset: str, epsilon: float) -> str:
    return f"raise {dataset} to {epsilon:g}"


class PrivacyLedger(io.ComfyNode):
    """Show the privacy ledger; raise one image set's budget only when confirmed."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DpaggPrivacyLedger",
            display_name="Privacy Ledger (dpagg)",
            category=CATEGORY,
            description=(
                "Shows every image set's privacy budget, what is spent and each release. "
                "'raise budget' sets one image set's budget to new_budget_epsilon, only when "
                "confirm reads exactly 'raise <dataset> to <epsilon>'."
            ),
            inputs=[
                io.Combo.Input("action", options=list(ACTIONS), default="show"),
                io.String.Input(
                    "dataset",
                    default="",
                    tooltip="image-set id (ds-...), as the loaders show it; empty: all sets",
                ),
                io.Float.Input("new_budget_epsilon", default=0.0, min=0.0, max=1000.0, step=0.1),
                io.Float.Input(
                    "new_budget_delta",
                    default=0.0,
                    min=0.0,
                    max=0.5,
                    step=1e-6,
                    round=False,
                    tooltip="0 keeps the recorded delta",
                ),
                io.String.Input(
                    "confirm",
                    default="",
                    tooltip="to raise: type 'raise <dataset> to <epsilon>' (a deliberate act; a "
                    "privacy budget raised cannot be taken back once spent)",
                ),
            ],
            outputs=[io.String.Output(display_name="summary")],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs: Any) -> Any:
        return float("nan")  # never cached: the ledger changes outside the graph

    @classmethod
    def execute(
        cls, action, dataset, new_budget_epsilon, new_budget_delta, confirm
    ) -> io.NodeOutput:
        ledger = comfy_ledger()
        dataset = str(dataset).strip()
        done = []
        if action == "raise budget":
            eps = float(new_budget_epsilon)
            want = confirmation_text(dataset, eps)
            if not dataset or eps <= 0:
                raise DpaggError(
                    "raise budget: set dataset (the ds-... id the loaders show) and "
                    "new_budget_epsilon > 0. Nothing was changed."
                )
            if str(confirm).strip() != want:
                raise DpaggError(
                    f"raise budget: type exactly '{want}' into confirm to raise this image "
                    "set's budget. Nothing was changed."
                )
            status = ledger.status(dataset)
            old = status["budget"]
            delta = float(new_budget_delta) or (old["delta"] if old else 0.0)
            if delta <= 0:
                raise DpaggError(
                    "raise budget: this image set has no recorded budget; set new_budget_delta "
                    "too. Nothing was changed."
                )
            ledger.set_budget(dataset, eps, delta)
            was = "not set" if old is None else fmt(old["epsilon"])
            done.append(f"budget of {dataset}: {was} -> {fmt(eps)} (delta {delta:.3g})")
        lines, table = ledger_lines(ledger, dataset)
        lines = done + lines
        text = "\n".join(lines)
        return io.NodeOutput(text, ui=_ui("Privacy Ledger", lines, datasets=table))


NODES: tuple[type[io.ComfyNode], ...] = (PrivacyLedger,)
