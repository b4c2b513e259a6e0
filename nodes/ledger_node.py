"""Privacy Ledger node: every image set's budget and releases — the ComfyUI way to do what
``dpagg ledger show`` does (ComfyUI's install puts no ``dpagg`` command on PATH) — and the route
behind its "Raise budget..." dialog.

Showing reads public ledger columns only (dataset ids, budgets, spend, release names and
epsilons). The node never raises a budget (DESIGN.md invariant 10): a graph can compute any
string — a shared workflow once linked Ledger(show) through ComfyUI's regex / concatenate nodes
into a second Ledger node's dataset and confirmation and raised a budget from 1 to 1000 — and a
saved workflow or PNG carries every widget value. Raising is a deliberate act of the person at the
machine: the node's "Raise budget..." button (``js/dpagg.js``) opens a dialog where they type the
dataset id, epsilon, delta and the confirmation ``raise <dataset> to <epsilon>``; it POSTs JSON to
:data:`ROUTE` on ComfyUI's own server (same app, same middleware as ComfyUI's API), which calls
:func:`raise_budget` and then ``Ledger.set_budget``. Nothing of the dialog is a widget, so nothing
of it is saved in a workflow. The CLI (``ledger set-budget``) does the same from a terminal.

A workflow saved before this change may still carry ``action = "raise budget"`` and a
confirmation: it still loads, and is refused (before anything runs, and again in ``execute``)
with a message saying how to raise; nothing is changed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any

from comfy_api.latest import io

from dpagg_core.budget_report import fmt, ledger_lines
from dpagg_core.errors import BudgetExceeded, DpaggError

from .budget_status import ROUTE as STATUS_ROUTE
from .budget_status import notify_ledger_changed, status_route
from .common import CATEGORY, _ui, comfy_ledger, ledger_path

ACTIONS = ("show",)
LEGACY_RAISE = "raise budget"  # the action of workflows saved before raising left the graph
ROUTE = "/dpagg/ledger/budget"  # also served as /api/dpagg/ledger/budget (ComfyUI adds /api)
BUTTON = "Raise budget..."
_CONFIRM = re.compile(r"raise\s+(\S+)\s+to\s+(\S+)")
log = logging.getLogger("dpagg")


def confirmation_text(dataset: str, epsilon: float) -> str:
    return f"raise {dataset} to {epsilon:g}"


def cli_command(dataset: str = "DATASET", path: Path | None = None) -> str:
    """The terminal command that sets a budget, with ComfyUI's own Python, from the pack."""
    pack = Path(__file__).resolve().parent.parent
    if path is None:
        try:
            path = ledger_path()
        except Exception:  # noqa: BLE001 (no folder_paths: name the option instead)
            path = None
    where = f" --ledger {path}" if path is not None else ""
    return (
        f"cd {pack} && {sys.executable} -m dpagg_core.cli ledger set-budget{where} "
        f"--dataset {dataset} --epsilon E --delta D"
    )


def how_to_raise(dataset: str = "") -> str:
    ds = dataset or "DATASET"
    return (
        f"To raise a budget, click '{BUTTON}' on the Privacy Ledger node and type the dataset "
        f"id, the new epsilon (and delta) and the confirmation 'raise {ds} to <epsilon>'; or in "
        f"a terminal: `{cli_command(ds)}`."
    )


def refusal(action: Any, dataset: Any = "") -> str:
    """The message for any action but 'show' (an old saved workflow's 'raise budget')."""
    ds = str(dataset or "").strip()
    if str(action) == LEGACY_RAISE:
        why = (
            "Privacy Ledger: action 'raise budget' is refused. A workflow can no longer raise a "
            "budget (a shared or saved workflow could compute or carry the confirmation); this "
            "one was saved before that change. Nothing was changed. Set action to 'show'. "
        )
    else:
        why = f"Privacy Ledger: unknown action {str(action)!r}; use 'show'. Nothing was changed. "
    return why + how_to_raise(ds)


class PrivacyLedger(io.ComfyNode):
    """Show the privacy ledger (every image set's budget, spend and releases)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DpaggPrivacyLedger",
            display_name="Privacy Ledger (dpagg)",
            category=CATEGORY,
            description=(
                "Shows every image set's privacy budget, what is spent and each release. To "
                f"raise a budget, click '{BUTTON}' on this node (a dialog where you type the "
                "dataset id, epsilon, delta and a confirmation) or use the CLI's "
                "'ledger set-budget'; a workflow never raises a budget."
            ),
            inputs=[
                io.Combo.Input(
                    "action",
                    options=list(ACTIONS),
                    default="show",
                    tooltip=f"show the ledger. Raising a budget is the '{BUTTON}' button, not "
                    "part of the workflow ('raise budget' in an older saved workflow is refused)",
                ),
                io.String.Input(
                    "dataset",
                    default="",
                    tooltip="image-set id (ds-...), as the loaders show it; empty: all sets",
                ),
            ],
            outputs=[io.String.Output(display_name="summary")],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def validate_inputs(cls, action: Any = "show", dataset: Any = "") -> bool | str:
        # Taking `action` here replaces ComfyUI's own list check for it: an old workflow's
        # 'raise budget' gets this message (before anything runs) instead of "not in list".
        return True if action == "show" else refusal(action, dataset)

    @classmethod
    def fingerprint_inputs(cls, **kwargs: Any) -> Any:
        return float("nan")  # never cached: the ledger changes outside the graph

    @classmethod
    def execute(cls, action, dataset) -> io.NodeOutput:
        if action != "show":  # validate_inputs refused it already; never raise from a graph
            raise DpaggError(refusal(action, dataset))
        ledger = comfy_ledger()
        lines, table = ledger_lines(ledger, str(dataset).strip())
        text = "\n".join(lines)
        query = {"ledger": True, "dataset": str(dataset).strip()}  # refreshed by js/dpagg.js
        ui = _ui("Privacy Ledger", lines, datasets=table, ledger_query=query)
        return io.NodeOutput(text, ui=ui)


NODES: tuple[type[io.ComfyNode], ...] = (PrivacyLedger,)


# ------------------------------------------------------------- the "Raise budget..." route


def _number(body: dict[str, Any], key: str, default: float | None = None) -> float:
    value = body.get(key, default)
    if value is None:
        raise DpaggError(f"'{key}' is missing: give a number.")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DpaggError(f"'{key}'={value!r} is not a number.")
    value = float(value)
    if not math.isfinite(value):
        raise DpaggError(f"'{key}'={value!r} is not a finite number.")
    return value


def raise_budget(ledger: Any, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """The route's whole logic: ``(HTTP status, JSON reply)`` for one request.

    Accepts only ``application/json`` (415 otherwise: a browser cannot send that cross-origin
    without a CORS preflight, which ComfyUI's middleware does not grant) holding
    ``{"dataset", "epsilon", "delta" (optional; 0 keeps the recorded delta), "confirm"}``, where
    ``confirm`` is the typed ``raise <dataset> to <epsilon>`` naming exactly that dataset and
    epsilon (400 otherwise). The dataset must be one the ledger knows (404). Then
    ``Ledger.set_budget`` (409 when below what is already spent). Nothing is changed on any error.
    """

    def refused(status: int, message: str) -> tuple[int, dict[str, Any]]:
        return status, {"ok": False, "error": f"{message} Nothing was changed."}

    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        return refused(415, f"send the request as application/json, not {content_type!r}.")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return refused(400, f"the body is not JSON ({exc}).")
    if not isinstance(data, dict):
        return refused(400, "the body must be a JSON object.")
    dataset = data.get("dataset")
    confirm = data.get("confirm")
    if not isinstance(dataset, str) or not dataset.strip():
        return refused(400, "'dataset' must be the image-set id (ds-...) the ledger shows.")
    dataset = dataset.strip()
    try:
        epsilon = _number(data, "epsilon")
        delta = _number(data, "delta", 0.0)
    except DpaggError as exc:
        return refused(400, str(exc))
    if epsilon <= 0 or not 0 <= delta < 1:
        return refused(400, f"epsilon={epsilon:g} must be > 0 and delta={delta:g} in [0, 1).")
    want = confirmation_text(dataset, epsilon)
    typed = _CONFIRM.fullmatch(confirm.strip()) if isinstance(confirm, str) else None
    if typed is None or typed.group(1) != dataset or not _same_number(typed.group(2), epsilon):
        return refused(400, f"type exactly '{want}' as the confirmation to set this budget.")
    if dataset not in ledger.dataset_ids():
        return refused(404, f"the ledger knows no image set {dataset!r}; use an id it shows.")
    old = ledger.status(dataset)["budget"]
    delta = delta or (old["delta"] if old else 0.0)
    if delta <= 0:
        return refused(400, "this image set has no recorded budget: give delta too.")
    try:
        ledger.set_budget(dataset, epsilon, delta)
    except BudgetExceeded as exc:
        return refused(409, str(exc))
    except DpaggError as exc:
        return refused(400, str(exc))
    was = "not set" if old is None else fmt(old["epsilon"])
    done = f"budget of {dataset}: {was} -> {fmt(epsilon)} (delta {delta:.3g})"
    log.info("[dpagg] Privacy Ledger: %s (the '%s' dialog)", done, BUTTON)
    notify_ledger_changed(dataset)  # every node on the page re-reads its budget lines
    lines, table = ledger_lines(ledger, dataset)
    return 200, {
        "ok": True,
        "dataset": dataset,
        "budget": {"epsilon": epsilon, "delta": delta},
        "was": old,
        "lines": [done, *lines],
        "datasets": table,
    }


def _same_number(text: str, value: float) -> bool:
    try:
        return float(text) == value
    except ValueError:
        return False


async def raise_budget_route(request: Any) -> Any:
    """aiohttp handler of :data:`ROUTE` (ComfyUI's PromptServer app and middleware)."""
    from aiohttp import web

    body = await request.read()
    status, reply = await asyncio.to_thread(
        lambda: raise_budget(comfy_ledger(), request.content_type, body)
    )
    return web.json_response(reply, status=status)


def register_routes() -> bool:
    """Add :data:`ROUTE` to ComfyUI's ``PromptServer.instance.routes`` (before ComfyUI serves
    them, as custom nodes do). False where there is no ComfyUI server (tests, plain imports)."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    routes = getattr(instance, "routes", None)
    if routes is None or not hasattr(routes, "post"):
        return False
    if not getattr(instance, "_dpagg_ledger_route", False):
        routes.post(ROUTE)(raise_budget_route)
        routes.post(STATUS_ROUTE)(status_route)  # read-only: fresh budget lines for the page
        instance._dpagg_ledger_route = True
    return True
