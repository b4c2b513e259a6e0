"""The "Private style (DP)" tab's HTML: the WebUI skin's markup, next to the host (issue 19
item 3). ``dpagg_core.webui`` returns data (the plan view dict, :class:`RunReport`, a rehearsal's
summary, plain text lines of ``dpagg_core.budget_report``); this module only turns it into the
tab's HTML. Every value is escaped: a file name such as ``<img src=x onerror=...>.jpg`` in an
error shows as text, never becomes markup.

How it loads. AUTOMATIC1111 1.10 and Forge load EVERY ``.py`` file of an extension's
``scripts/`` folder as a script (``modules/scripts.py`` ``load_scripts`` ->
``script_loading.load_module``: ``importlib`` from the file's path, the file name as the module
name, the extension folder on ``sys.path`` while it runs; ``scripts/`` itself is never on
``sys.path``, so ``import dpagg_webui_html`` would fail). So this file is loaded twice and is
harmless either way: the WebUI's load defines functions only (no ``Script`` class, no callback),
and ``dpagg_webui_tab.py`` loads its own copy from its own folder by path (``_sibling``), which
needs no ``sys.path`` entry and no load order. Loading it imports nothing of ``dpagg_core``: its
functions import ``dpagg_core``'s text modules when called (the tab has imported ``dpagg_core``
by then). An import at the top would run ``dpagg_core/__init__`` inside the WebUI's load of THIS
file, and the ``_deps`` folder (dp-accounting) it appends to ``sys.path`` would vanish with the
temporary ``sys.path`` the WebUI restores after each script: the tab would then find no
dp-accounting (the Forge test caught exactly that).
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from collections.abc import Mapping
from typing import Any

REHEARSE_INFO = (
    "see what your n and epsilon give before touching the private pictures: the same model, TI "
    "settings, plan, C and recipe on n PUBLIC images of a similar style, at half, your and "
    "double epsilon, beside the non-private mean and the model without an embedding. Nothing is "
    "spent or recorded; a folder holding a picture recorded as private is refused. The grid is "
    "drawn when 'with/without preview' is on."
)


def error_html(message: Any, lead: str = "") -> str:
    """An error for the tab, escaped; ``lead`` is trusted markup."""
    text = html.escape(str(message))
    return f"<div class='dpagg-error' style='color:#d33'>{lead}{text}</div>"


def inputs_key(values: Mapping[str, Any]) -> str:
    """A short digest of the tab's field values (public settings and paths)."""
    text = json.dumps(dict(values), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def refusal_html(message: Any, values: Mapping[str, Any]) -> str:
    """A refused run ("Nothing released: ..."), escaped, marked with the digest of the fields it
    was refused for (:func:`stale_refusal`)."""
    text = html.escape(str(message))
    return (
        f"<div class='dpagg-error dpagg-refusal' data-inputs='{inputs_key(values)}' "
        f"style='color:#d33'><b>Nothing released:</b> {text}</div>"
    )


def stale_refusal(result: Any, values: Mapping[str, Any]) -> bool:
    """Whether ``result`` (the result box's HTML) is a refusal made for OTHER field values: the
    plan refresh then clears it, so a refusal the user has since fixed (e.g. a missing budget)
    does not stay in red under a plan that now fits. A refusal of these very values (a plan
    refresh racing the run, e.g. a number field left by clicking Train) stays."""
    found = re.search(r"dpagg-refusal' data-inputs='([0-9a-f]+)'", str(result or ""))
    return bool(found) and found.group(1) != inputs_key(values)


def _budget_line(budget: Mapping[str, Any]) -> str:
    from dpagg_core.budget_report import budget_line  # on call: the module docstring says why

    total, spent = budget.get("total"), budget["spent"]
    return budget_line(
        (spent["epsilon"], spent["delta"]),
        None if total is None else (total["epsilon"], total["delta"]),
        budget["releases"],
        budget["composition"],
    )


def plan_html(view: Mapping[str, Any]) -> str:
    """``webui.plan_view``'s dict as the tab shows it (red when the next release would be
    refused; the hint before a folder is chosen)."""
    from dpagg_core.budget_report import BUDGET_MEANING
    from dpagg_core.budget_report import fmt as _fmt
    from dpagg_core.webui_settings import PLAN_HINT, budget_required_message

    esc = html.escape
    if not view.get("ok") and view.get("hint"):
        return f"<div class='dpagg-plan'>{esc(PLAN_HINT)}</div>"
    if not view.get("ok"):
        return error_html(view.get("error"))
    plan = view["plan"]
    lines = [
        f"<b>{view['n']} private images</b>, image set <code>{esc(view['dataset_id'])}</code>",
        f"plan: epsilon {_fmt(plan['epsilon'])}, delta {plan['delta']:.3g}, noise multiplier "
        f"{_fmt(plan['noise_multiplier'])}, sampling {esc(plan['sampling'])} "
        f"({esc(plan['accountant'])})",
        esc(_budget_line(view["budget"])),
    ]
    if view.get("forecast"):
        lines.append(f"<span class='dpagg-forecast'>{esc(view['forecast']['text'])}</span>")
    nxt = view["next_release"]
    cost = f"next release costs epsilon {_fmt(nxt['epsilon'])}, delta {nxt['delta']:.3g}"
    if view.get("needs_budget"):
        lines.append(
            "<span class='dpagg-needs-budget' style='color:#d33;font-weight:bold'>"
            f"{esc(budget_required_message(nxt['epsilon']))}"
            "</span>"
        )
    elif view["budget"].get("total") is None and nxt.get("budget"):
        lines.append(
            esc(
                f"this first release sets the budget to epsilon {_fmt(nxt['budget']['epsilon'])}"
                f", delta {nxt['budget']['delta']:.3g}: {BUDGET_MEANING}"
            )
        )
    if view["exceeds"]:
        lines.append(
            f"<span style='color:#d33;font-weight:bold'>{esc(cost)}: it would EXCEED the budget "
            "and will be refused (nothing is spent)</span>"
        )
    elif view.get("maybe_recorded"):
        lines.append(
            "<span class='dpagg-recorded' style='color:#c80'>"
            + esc(
                "an earlier release of this image set has the same plan, clip norm and name: "
                "with the same checkpoint and training settings (steps, seed, ...) this is an "
                "identical re-run, answered from the ledger's record at no cost; any other "
                f"release ({cost}) would exceed the budget and is refused before training"
            )
            + "</span>"
        )
    else:
        after = nxt.get("spent_after") or {}
        if after:
            cost += f" (spent after: epsilon {_fmt(after['epsilon'])})"
        lines.append(esc(cost))
    if view.get("delta_warning"):
        lines.append(f"<span style='color:#d33'>{esc(view['delta_warning'])}</span>")
    lines += [f"<span style='color:#c80'>warning: {esc(w)}</span>" for w in view["warnings"]]
    klass = "dpagg-plan dpagg-exceeds" if view["exceeds"] else "dpagg-plan"
    return f"<div class='{klass}'>" + "<br>".join(lines) + "</div>"


def report_html(report: Any) -> str:
    """A run's result (``webui.RunReport``, public values only) with its privacy record."""
    from dpagg_core.budget_report import budget_line
    from dpagg_core.webui_settings import recipe_line

    esc = html.escape
    head = (
        "re-used the identical earlier release (nothing spent)"
        if report.reused
        else "released a new differentially private embedding"
    )
    b = report.budget
    budget = budget_line(
        (b["spent_epsilon"], b["spent_delta"]),
        (b["epsilon"], b["delta"]),
        None,
        b["composition"],
    )
    rows = "".join(
        f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>"
        for k, v in sorted(report.record.items())
    )
    return (
        f"<div class='dpagg-report'><b>{esc(head)}</b>: <code>{esc(report.file)}</code><br>"
        f"use it in a prompt as: <code>{esc(report.prompt_word)}</code> "
        f"(e.g. <i>a lighthouse, in the style of {esc(report.prompt_word)}</i>)<br>"
        f"{esc(budget)}<br>"
        + (f"{esc(recipe_line(report.recipe))}<br>" if report.recipe else "")
        + "privacy record (stored in the file header):"
        f"<table class='dpagg-record'>{rows}</table></div>"
    )


def rehearsal_html(out: Mapping[str, Any]) -> str:
    """A rehearsal's summary (``webui.rehearse``) for the tab; the grid is shown beside it."""
    from dpagg_core.webui_settings import recipe_line

    lines = out["text"].splitlines()
    if out.get("recipe"):
        lines.insert(1, recipe_line(out["recipe"]))
    body = "<br>".join(html.escape(line) for line in lines)
    return f"<div class='dpagg-rehearsal'>{body}</div>"


def suggest_html(out: Mapping[str, Any]) -> str:
    """A clip-norm suggestion (``webui.suggest_clip_norm``) as escaped text."""
    return html.escape(
        f"suggested C = {out['clip_norm']:.4g}: the {out['quantile']:.0%} quantile of "
        f"{out['n_public']} PUBLIC images' distances to the centre (median "
        f"{out['distances']['median']:.4g})"
    )


def rehearse_info_html() -> str:
    """What a rehearsal is, above its fields."""
    return f"<div class='dpagg-rehearse-info'>{html.escape(REHEARSE_INFO)}</div>"
