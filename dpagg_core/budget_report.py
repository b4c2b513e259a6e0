"""The words of a plan, a release, an image set's budget and the ledger: ONE text module.

The CLI and the demo (a release, a released file's record, ``dpagg inspect``), the ComfyUI nodes
(DP Aggregate, Privacy Accountant, Load Private Images, Privacy Ledger) and the WebUI tab
(``dpagg_core.webui``) build their plan, release and budget text and figures here, so the same
plan and the same ledger read alike everywhere (issue 19 item 3). Markup stays with its host
(the tab's HTML in ``scripts/dpagg_webui_html.py``, the nodes' UI messages in ``nodes/``).

Public values only (docs/privacy.md invariant 4): the plan, the ledger's budgets, composed spend,
release counts, names and epsilons. Budget checks are the ledger's dry run (``Ledger.check``):
nothing is drawn or written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpagg_core.errors import BudgetExceeded
from dpagg_core.privacy.plan_text import composition_words

if TYPE_CHECKING:  # no import of the accountant (dp-accounting) just to show text
    from dpagg_core.privacy.plan import PrivacyPlan

BUDGET_NOT_SET = "budget: not set yet (the first release sets it)"
BUDGET_MEANING = "the total epsilon this image set may ever spend, all its releases together"


def needs_budget(recorded_budget: Any, budget_epsilon: float | None) -> bool:
    """True when a release would be an image set's first without a deliberate budget: the
    ledger records none for its pictures (``budget_status(...)["budget"]`` is None) and none was
    chosen. The ledger would then default the budget to this release's epsilon, which allows
    exactly one release (issue 20 item 10), so every front end asks for it instead: a silent
    default would make the most important number of the guarantee nobody's choice."""
    return recorded_budget is None and not budget_epsilon


def budget_required_message(plan_epsilon: float, field: str, *, refused: bool = False) -> str:
    """What a front end says when :func:`needs_budget`: ``field`` names its own input (the
    CLI's ``--budget-epsilon``, the tab's "budget epsilon", the node's ``budget_epsilon``)."""
    text = (
        f"{field}: choose {BUDGET_MEANING}, before its first release (this release alone costs "
        f"epsilon {fmt(plan_epsilon)}; a budget equal to it allows this one release only). It is "
        "recorded with the pictures and every later release must fit in it; raising it later "
        "is a deliberate ledger command."
    )
    return text + (" Nothing was spent." if refused else "")


def fmt(x: float) -> str:
    return f"{x:.4g}"


# The accountant of a plan in words (a node showed a bare "(pld)"): issue 20 item 4.
ACCOUNTANT_WORDS = {
    "analytic_gaussian": "analytic Gaussian accountant",
    "analytic_gaussian+wor_amplification(BBG18)": "analytic Gaussian accountant with subsampling",
    "rdp_wor": "Renyi DP accountant, subsampled",
    "pld": "privacy loss distribution accountant",
    "pld(unamplified)": "privacy loss distribution accountant (no subsampling credit)",
    "pld_poisson": "privacy loss distribution accountant, Poisson subsampled",
    "group-privacy": "group privacy bound",
}


def accountant_words(name: str) -> str:
    return ACCOUNTANT_WORDS.get(str(name), f"{name} accountant")


def sampling_words(plan: PrivacyPlan) -> str:
    """Which images a release of ``plan`` averages: ``m=5 of n=50``, ``q=0.1 of n=50``,
    ``all n=50``."""
    if plan.sampling == "wor":
        return f"m={plan.m} of n={plan.n}"
    if plan.sampling == "poisson":
        return f"q={plan.q:g} of n={plan.n}"
    return f"all n={plan.n}"


def plan_lines(plan: PrivacyPlan) -> list[str]:
    """Short public description of a plan for the node's display."""
    return [
        f"plan: eps={fmt(plan.epsilon)}, delta={plan.delta:.3g}, noise multiplier="
        f"{fmt(plan.noise_multiplier)}",
        f"{plan.sampling} ({sampling_words(plan)}), {plan.releases} release(s), "
        f"{accountant_words(plan.accountant)}",
    ]


def spent_line(dataset_id: str, status: dict[str, Any]) -> str:
    """The one budget figure every node and the Privacy Ledger show alike: what is spent of the
    budget and how many releases (issue 20 item 3: one figure on screen)."""
    b, spent = status["budget"], status["spent"]
    budget = "not set" if b is None else f"{fmt(b['epsilon'])} (delta {b['delta']:.3g})"
    count = status["releases"]
    return f"{dataset_id}: spent eps {fmt(spent['epsilon'])} of {budget}, {count} release(s)"


def next_release_line(
    ledger: Any,
    dataset_id: str,
    plan: PrivacyPlan,
    budget_epsilon: float | None = None,
    budget_delta: float | None = None,
) -> tuple[str | None, float | None]:
    """("the next release can be at most epsilon X at delta Y ...", X): the remaining budget as
    what the user can do with it, by the accountant the refusal uses for its "largest epsilon
    that fits" (``Ledger.largest_next_epsilon``); (None, None) before a budget is known."""
    best = ledger.largest_next_epsilon(dataset_id, plan, budget_epsilon, budget_delta)
    if best is None:
        if needs_budget(ledger.status(dataset_id)["budget"], budget_epsilon):
            return None, None
        return (
            "the budget is used up: no release that includes these pictures fits any more, "
            "whatever its epsilon",
            0.0,
        )
    if best != best:  # NaN: the plan cannot be re-calibrated; say nothing wrong
        return None, None
    return (
        f"the next release can be at most epsilon {best:.3g} at delta {plan.delta:.3g} "
        f"({plan.sampling} sampling, {sampling_words(plan)})",
        best,
    )


def budget_status(ledger: Any, dataset_id: str) -> dict[str, Any]:
    """The public budget figures of a dataset: ``{"budget", "spent", "remaining", "releases",
    "composition", "shared"}`` of ``Ledger.status`` (``budget`` and ``remaining`` None before the
    first release). The budget lives with each picture; these are the set's worst picture's
    (docs/privacy.md invariant 9); ``shared``: that picture also took part in releases of
    other, overlapping sets."""
    status = ledger.status(dataset_id)
    keys = ("budget", "spent", "remaining", "releases", "composition", "shared")
    return {k: status.get(k) for k in keys}


def next_release(
    ledger: Any,
    dataset_id: str,
    plan: PrivacyPlan,
    budget_epsilon: float | None = None,
    budget_delta: float | None = None,
) -> dict[str, Any]:
    """Cost of one more release of ``plan`` (the ledger's dry run): ``{"epsilon", "delta"}`` and
    ``spent_after``/``budget`` if it would pass, ``refused`` (the ledger's message) if not."""
    out: dict[str, Any] = {"epsilon": plan.epsilon, "delta": plan.delta}
    try:
        check = ledger.check(dataset_id, plan, budget_epsilon, budget_delta, mode="clip")
    except BudgetExceeded as exc:
        out["refused"] = str(exc)
        return out
    out["spent_after"] = check.get("spent_after")
    out["budget"] = check.get("budget")
    return out


def budget_payload(
    ledger: Any,
    dataset_id: str,
    plan: PrivacyPlan | None,
    budget_epsilon: float | None = None,
    budget_delta: float | None = None,
) -> tuple[list[str], bool, dict[str, Any]]:
    """Lines, warning flag and figures of a dataset's budget (public: from the ledger only).

    The same lines for the same ledger state on every node (its spent figure is the Privacy
    Ledger's, :func:`spent_line`); with a plan, what the next release can be
    (:func:`next_release_line`) and whether this plan fits. ``warning`` is True when one more
    release of ``plan`` would be refused (dry run ``Ledger.check``; nothing is drawn or
    written). The nodes' frontend re-asks for these lines after any release (``budget_query``
    in the UI message, served by the pack's status route), so no node keeps a stale figure."""
    status = budget_status(ledger, dataset_id)
    lines: list[str] = [spent_line(dataset_id, status)]
    if status["budget"] is None:
        lines.append(BUDGET_NOT_SET)
    if status.get("shared"):
        lines.append(
            "some of these pictures were also released with other image sets: their spend counts "
            "here too (the budget protects each picture)"
        )
    warning = False
    most = None
    if plan is not None:
        text, most = next_release_line(ledger, dataset_id, plan, budget_epsilon, budget_delta)
        if text:
            lines.append(text)
        warning = "refused" in next_release(ledger, dataset_id, plan, budget_epsilon, budget_delta)
        if warning:
            lines.append(
                f"WARNING: the next release with this plan (epsilon {fmt(plan.epsilon)}) would "
                "exceed the budget"
            )
    figures = {
        "budget": status["budget"],
        "spent": status["spent"],
        "remaining": status["remaining"],
        "releases": status["releases"],
        "next_release_exceeds": warning,
        "next_release_max_epsilon": most,
    }
    return lines, warning, figures


def budget_request_lines(
    recorded: dict[str, float] | None, be: float | None, bd: float | None, reused: bool
) -> list[str]:
    """What DP Aggregate's budget_epsilon/budget_delta did when they differ from the recorded
    budget: a lower value caps this request only (the recorded budget, shown as "/ total",
    is unchanged), and a reused release was returned without any budget check."""
    if recorded is None:
        return []
    out = []
    for label, req, cur in (("epsilon", be, recorded["epsilon"]), ("delta", bd, recorded["delta"])):
        if req is None or req >= cur * (1 - 1e-9):
            continue
        if reused:
            out.append(
                f"budget_{label}={req:g} was not applied: this identical request was released "
                f"before, so its recorded release came back at no cost"
            )
        out.append(
            f"budget_{label}={req:g} is below the recorded budget {cur:g}: it caps new releases "
            f"of this node only; the image set's budget stays {cur:g} (set it with the "
            "Privacy Ledger node)"
        )
    return out


def ledger_lines(ledger: Any, only: str = "") -> tuple[list[str], list[dict[str, Any]]]:
    """One block per dataset: budget, spend, and each release (name, epsilon, reused or not)."""
    datasets = [only] if only else ledger.dataset_ids()
    lines = [f"ledger {ledger.path}", f"{len(datasets)} image set(s)"]
    table = []
    for ds in datasets:
        st = ledger.status(ds)
        b = st["budget"]
        spent = st["spent"]
        lines.append(spent_line(ds, st))
        releases = ledger.list_releases(ds)
        for r in releases:  # the file actually written (mystyle-2), else the requested name
            name = ", ".join(r.get("files") or []) or r["name"]
            lines.append(
                f"  #{r['id']} {r['created'][:19]} {name} eps {fmt(r['epsilon'])} "
                f"delta {r['delta']:.3g}"
            )
        table.append(
            {
                "dataset": ds,
                "budget": b,
                "spent": spent,
                "releases": [
                    {
                        "id": r["id"],
                        "name": r["name"],
                        "files": r.get("files") or [],
                        "epsilon": r["epsilon"],
                    }
                    for r in releases
                ],
            }
        )
    return lines, table


# ----------------------------------------------------------------------------------------------
# A release and a released file (the CLI and the demo print these)
# ----------------------------------------------------------------------------------------------


def budget_line(
    spent: tuple[float, float],
    total: tuple[float, float] | None,
    releases: int | None,
    composition: str,
) -> str:
    """THE budget line of an image set: spent of total epsilon (and delta), releases (None: not
    counted here), composition in words. No "X left": composition is sub-additive, so what the
    next release may cost is the accountant's answer (``next_release_line``), not a difference
    (issue 20 item 4). ``total`` None: no budget recorded yet."""
    if total is None:
        return BUDGET_NOT_SET
    parts = [] if releases is None else [f"{releases} release(s)"]
    how = composition_words(composition)
    parts += [how] if how else []
    return (
        f"budget: epsilon {fmt(spent[0])} / {fmt(total[0])} spent (delta "
        f"{spent[1]:.3g} / {total[1]:.3g})" + (f"; {', '.join(parts)}" if parts else "")
    )


def print_payload(payload: dict[str, Any], text: str, *, as_json: bool = False) -> None:
    """Print ``payload`` as JSON (``--json``) or ``text``."""
    if as_json:
        print(json.dumps(payload, indent=2, sort_keys=True, default=str))
    else:
        print(text)


def record_text(record: dict[str, str]) -> str:
    width = max(len(k) for k in record)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in sorted(record.items()))


def release_text(outcome: Any, method: str = "") -> str:
    """A ``release.ReleaseOutcome``: file, prompt, privacy record, budget."""
    b = outcome.summary()["budget"]
    label = f" {method}" if method else ""
    head = (
        f"re-used the identical earlier{label} release (nothing spent)"
        if outcome.reused
        else f"released {outcome.path}" + (f" ({method})" if method else "")
    )
    budget = budget_line(
        (b["spent_epsilon"], b["spent_delta"]), (b["epsilon"], b["delta"]), None, b["composition"]
    )
    return "\n".join(
        [
            head,
            f"use it in a prompt as: {outcome.prompt}",
            "privacy record (stored in the file header):",
            record_text(outcome.record),
            budget,
        ]
    )


def describe_text(file: str | Path, info: dict[str, Any]) -> str:
    """``dpagg inspect``'s listing of a released file's ``describe`` output."""
    lines = [f"{file}:"]
    for k, v in info.items():
        if isinstance(v, dict):
            lines.append(f"{k}:")
            lines.append(record_text({str(a): str(b) for a, b in v.items()}) if v else "  -")
        else:
            lines.append(f"{k}: {v}")
    return "\n".join(lines)


def release_shaping(
    record: dict[str, str], plan: PrivacyPlan, clip_norm: float, flat_dim: int
) -> tuple[list[str], dict[str, Any]]:
    """Lines and figures for a release's public centre, basis and post-processing (public
    values from its record and plan only)."""
    lines: list[str] = []
    figures: dict[str, Any] = {}
    sigma = plan.noise_std(clip_norm)
    if record.get("centre_sha256"):
        lines.append(
            f"centre {record.get('centre')}: sha256 {record['centre_sha256'][:16]}... (public)"
        )
        figures["centre"] = {"kind": record.get("centre"), "sha256": record["centre_sha256"]}
    if record.get("basis_dim"):
        k_dim = int(record["basis_dim"])
        ratio = math.sqrt(k_dim / flat_dim)
        lines.append(
            f"basis {record['basis_kind']}, k = {record['basis_k']}: noise on K = {k_dim} of "
            f"D = {flat_dim} coordinates, noise norm ~{fmt(sigma * math.sqrt(k_dim))} instead "
            f"of ~{fmt(sigma * math.sqrt(flat_dim))} (x{ratio:.2f})"
        )
        figures["basis"] = {
            "kind": record["basis_kind"],
            "k": int(record["basis_k"]),
            "K": k_dim,
            "D": int(flat_dim),
            "sha256": record["basis_sha256"],
            "noise_norm_ratio": ratio,
        }
    if record.get("postprocess"):
        post = record["postprocess"]
        more = ""
        if "postprocess_js_factor" in record:
            more = f" (James-Stein factor {float(record['postprocess_js_factor']):.3f})"
        lines.append(f"post-processing: {post}{more}; no privacy cost")
        figures["postprocess"] = post
    return lines, figures
