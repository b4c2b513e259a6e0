"""One budget figure on screen (issue 20 item 3): the budget part of every dpagg node's status
comes from the ledger, and is re-read from it whenever any release happens.

Each node that shows an image set's budget (Load Private Images, Privacy Accountant, DP
Aggregate) puts in its UI message the budget lines (``budget_lines``, also the tail of
``lines``) and the public request that made them (``budget_query``: the dataset id, the plan and
the DP Aggregate budget caps, all public). The Privacy Ledger node puts ``ledger_query``.

* After a release (and after the "Raise budget..." dialog) the server sends the websocket event
  :data:`EVENT` (``PromptServer.instance.send_sync``); ``js/dpagg.js`` listens for it, and for the
  end of every queued prompt (cached nodes re-send their old UI message), and asks
  :data:`ROUTE` for fresh lines for every query on the page. So the Accountant that ran before
  DP Aggregate in the same prompt no longer says "budget: not set yet", and a cached Load
  Private Images no longer shows the spend of two releases ago.
* :data:`ROUTE` only reads the ledger (a dry run, like the nodes' own check): public figures,
  nothing drawn, nothing written; it is served by ComfyUI's own app and middleware, like the
  raise route (DESIGN.md invariant 10).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from dpagg_core.budget_report import budget_payload, ledger_lines, next_release
from dpagg_core.errors import DpaggError
from dpagg_core.privacy.plan import PrivacyPlan

from .common import comfy_ledger

ROUTE = "/dpagg/ledger/status"  # also /api/dpagg/ledger/status
EVENT = "dpagg.ledger"  # websocket event after a ledger change: {"dataset": id}
MAX_QUERIES = 64
log = logging.getLogger("dpagg")


def budget_query(
    dataset_id: str,
    plan: PrivacyPlan | None = None,
    targets: list[tuple[str, float | None, float | None]] | None = None,
    refusals: bool = False,
) -> dict[str, Any]:
    """The public request behind a node's budget lines (sent back to :data:`ROUTE`)."""
    return {
        "dataset": dataset_id,
        "plan": None if plan is None else plan.to_dict(),
        "targets": [list(t) for t in (targets or [])],
        "refusals": bool(refusals),
    }


def budget_block(ledger: Any, query: dict[str, Any]) -> tuple[list[str], bool, dict[str, Any]]:
    """(lines, warning, figures) of one :func:`budget_query`, from the ledger as it is now."""
    ds = query.get("dataset")
    if not isinstance(ds, str) or not ds.startswith("ds-"):
        raise DpaggError("dataset: an image-set id (ds-...) is needed")
    plan = None
    if query.get("plan") is not None:
        raw = query["plan"]
        if not isinstance(raw, dict):
            raise DpaggError("plan: a plan's public parameters are needed")
        fields = set(PrivacyPlan.__dataclass_fields__)
        plan = PrivacyPlan(**{k: v for k, v in raw.items() if k in fields}).check()
    targets = [
        (str(t[0]), _cap(t[1]), _cap(t[2]))
        for t in (query.get("targets") or [])
        if isinstance(t, (list, tuple)) and len(t) == 3
    ] or [("", None, None)]
    _, be, bd = targets[0]
    lines, warning, figures = budget_payload(ledger, ds, plan, be, bd)
    if plan is not None and query.get("refusals"):
        refusals = []
        for node_id, be, bd in targets:  # each DP Aggregate's own check, as a dry run
            refused = next_release(ledger, ds, plan, be, bd).get("refused")
            if refused is not None:
                where = f"DP Aggregate (node {node_id})" if node_id else "DP Aggregate"
                refusals.append(f"WARNING: {where} will refuse this plan: {short(refused)}")
        if refusals:  # they say it per DP Aggregate: no general warning besides
            lines = [x for x in lines if not x.startswith("WARNING: the next release with")]
        lines += refusals
        warning = warning or bool(refusals)
        figures["will_be_refused"] = figures["next_release_exceeds"] = bool(refusals)
    return lines, warning, figures


# Where a refusal's reason ends and its fix (the long "how to raise" text) begins.
_FIX_MARKERS = (" No noise was drawn", " A budget is never raised", " Fix:")


def short(refusal: str) -> str:
    """A refusal's reason without its fix (the Accountant's warning: DP Aggregate shows the
    whole message when it refuses; "the next release can be at most ..." is on the line above)."""
    cut = min((i for m in _FIX_MARKERS if (i := refusal.find(m)) > 0), default=len(refusal))
    return refusal[:cut].rstrip()


def _cap(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value > 0 else None


def ledger_block(ledger: Any, query: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The Privacy Ledger node's lines and table for its ``ledger_query``."""
    only = query.get("dataset") or ""
    return ledger_lines(ledger, str(only).strip())


def status_reply(ledger: Any, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """The status route's whole logic: ``{"queries": [...]}`` -> ``{"results": [...]}``, one
    result per query (``{"lines", "warning", "figures"}``, ``{"lines", "datasets"}`` for a
    ledger query, or ``{"error"}``). Reads only."""
    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        return 415, {"error": "send application/json"}
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return 400, {"error": "the body is not JSON"}
    queries = data.get("queries") if isinstance(data, dict) else None
    if not isinstance(queries, list) or len(queries) > MAX_QUERIES:
        return 400, {"error": f"give 'queries': a list of at most {MAX_QUERIES}"}
    results: list[dict[str, Any]] = []
    for query in queries:
        try:
            if not isinstance(query, dict):
                raise DpaggError("a query is an object")
            if query.get("ledger"):
                lines, table = ledger_block(ledger, query)
                results.append({"lines": lines, "datasets": table})
            else:
                lines, warning, figures = budget_block(ledger, query)
                results.append({"lines": lines, "warning": warning, "figures": figures})
        except (DpaggError, TypeError, ValueError) as exc:
            results.append({"error": str(exc)})
    return 200, {"results": results}


async def status_route(request: Any) -> Any:
    """aiohttp handler of :data:`ROUTE`."""
    from aiohttp import web

    body = await request.read()
    status, reply = await asyncio.to_thread(
        lambda: status_reply(comfy_ledger(), request.content_type, body)
    )
    return web.json_response(reply, status=status)


def notify_ledger_changed(dataset_id: str | None) -> bool:
    """Tell every open page that the ledger changed (:data:`EVENT`); False without a server."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    send = getattr(instance, "send_sync", None)
    if send is None:
        return False
    try:
        send(EVENT, {"dataset": dataset_id or ""})
    except Exception as exc:  # noqa: BLE001 - a page refresh must never fail a release
        log.warning("[dpagg] could not notify the pages of a ledger change: %s", exc)
        return False
    return True
