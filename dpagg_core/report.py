"""Text of what the command line and the demo print: a release, a released file, the budget.

One implementation for ``dpagg`` (``dpagg_core.cli``) and the demo (``dpagg_core.showcase.demo``):
the privacy record, the budget line, a release's summary and ``dpagg inspect``'s listing. Public
values only (the released file's record and the ledger's budget figures).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(payload: dict[str, Any], text: str, *, as_json: bool = False) -> None:
    """Print ``payload`` as JSON (``--json``) or ``text``."""
    if as_json:
        print(json.dumps(payload, indent=2, sort_keys=True, default=str))
    else:
        print(text)


def record_text(record: dict[str, str]) -> str:
    width = max(len(k) for k in record)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in sorted(record.items()))


def budget_text(summary: dict[str, Any]) -> str:
    b = summary["budget"]
    return (
        f"budget: spent epsilon {b['spent_epsilon']:.4g} of {b['epsilon']:.4g} "
        f"(remaining {b['remaining_epsilon']:.4g}), delta {b['spent_delta']:.3g} of "
        f"{b['delta']:.3g} [{b['composition']} composition]"
    )


def release_text(outcome: Any, method: str = "") -> str:
    """A ``release.ReleaseOutcome``: file, prompt, privacy record, budget."""
    summary = outcome.summary()
    label = f" {method}" if method else ""
    head = (
        f"re-used the identical earlier{label} release (nothing spent)"
        if outcome.reused
        else f"released {outcome.path}" + (f" ({method})" if method else "")
    )
    return "\n".join(
        [
            head,
            f"use it in a prompt as: {outcome.prompt}",
            "privacy record (stored in the file header):",
            record_text(outcome.record),
            budget_text(summary),
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
