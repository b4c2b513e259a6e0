"""Does the plan forecast (``dpagg_core.privacy.forecast``) say what the held-out benchmark saw?

    .venv/bin/python bench/forecast_check.py [--results bench/results_v3]     # seconds, no model

For every (n, epsilon) cell of the held-out grid and each public-subspace mean release (K = 32
noised coordinates: k = 16 per vector x 2 vectors), the forecast's verdict is computed from public
values only, exactly as a user sees it before spending: the recorded noise multiplier z of the
cell's plan (full sampling), K, and the documented default agreement ``DEFAULT_RHO`` (measured on
the 26 PUBLIC training styles by ``bench/snr_geometry.py``; no held-out style is read to set it).
Its thresholds (SNR 1 and 2) are fixed by the geometry, not fitted here.

The measured outcome of a cell is its share of the BEST non-private row at that n (``mean`` or
``ti_shared``, style accuracy averaged over styles x seeds), binned a priori: >= 75 % "clear",
25-75 % "weak", below 25 % "noise". Writes ``forecast_check.md`` (table and agreement) and
``forecast_check.png`` (SNR against share, thresholds drawn; Pillow) into the results folder.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from dpagg_core.privacy.forecast import CLEAR_SNR, DEFAULT_K, DEFAULT_RHO, WEAK_SNR, verdict_of

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("dpagg_sub_pm", "dpagg_sub")
NON_PRIVATE = ("mean", "ti_shared")
CLEAR_SHARE, WEAK_SHARE = 0.75, 0.25


def measured_verdict(share: float) -> str:
    return "clear" if share >= CLEAR_SHARE else "weak" if share >= WEAK_SHARE else "noise"


def cells(rows: list[dict], method: str) -> list[dict]:
    best: dict[int, float] = {}
    by_np: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r["method"] in NON_PRIVATE:
            by_np[(r["n"], r["method"])].append(r["acc"])
    for (n, _), accs in by_np.items():
        best[n] = max(best.get(n, 0.0), statistics.fmean(accs))
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["method"] == method:
            grouped[(r["n"], r["epsilon"])].append(r)
    out = []
    for (n, eps), rs in sorted(grouped.items()):
        z = statistics.fmean(r["z"] for r in rs)
        value = DEFAULT_RHO * n / (2 * z * math.sqrt(DEFAULT_K))  # full sampling: 2C/n
        share = statistics.fmean(r["acc"] for r in rs) / best[n]
        spread = statistics.pstdev([r["acc"] / best[n] for r in rs])
        out.append(
            {
                "n": n,
                "epsilon": eps,
                "snr": value,
                "forecast": verdict_of(value),
                "share": share,
                "spread": spread,
                "measured": measured_verdict(share),
            }
        )
    return out


def plot(points: dict[str, list[dict]], path: Path) -> None:
    from PIL import Image, ImageDraw

    w, h, pad = 640, 420, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xmax, ymax = 14.0, 1.2

    def xy(snr_value: float, share: float) -> tuple[float, float]:
        x = pad + (w - 2 * pad) * math.log1p(min(snr_value, xmax)) / math.log1p(xmax)
        return x, h - pad - (h - 2 * pad) * min(max(share, 0.0), ymax) / ymax

    d.rectangle([pad, pad, w - pad, h - pad], outline="black")
    for s in (WEAK_SNR, CLEAR_SNR):
        x, _ = xy(s, 0)
        d.line([x, pad, x, h - pad], fill=(150, 150, 150))
        d.text((x + 3, pad + 3), f"SNR {s:g}", fill="gray")
    for share in (WEAK_SHARE, CLEAR_SHARE, 1.0):
        _, y = xy(0, share)
        d.line([pad, y, w - pad, y], fill=(200, 200, 200))
        d.text((5, y - 6), f"{share:.0%}", fill="gray")
    colours = {"dpagg_sub_pm": (200, 30, 30), "dpagg_sub": (30, 30, 200)}
    for i, (method, cs) in enumerate(points.items()):
        for c in cs:
            x, y = xy(c["snr"], c["share"])
            d.ellipse([x - 4, y - 4, x + 4, y + 4], outline=colours[method], width=2)
        d.text((pad + 10, h - pad + 20 + 12 * i - 10), method, fill=colours[method])
    d.text((w // 2 - 120, 15), "forecast SNR (log scale) vs share of non-private", fill="black")
    img.save(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results_v3")
    args = ap.parse_args()
    rows = [json.loads(x) for x in (args.results / "results.jsonl").read_text().splitlines() if x]
    lines = [
        f"Forecast (K = {DEFAULT_K}, rho = {DEFAULT_RHO} from public styles; SNR >= {CLEAR_SNR:g} "
        f"clear, >= {WEAK_SNR:g} weak) against the measured share of the best non-private row "
        f"(>= {CLEAR_SHARE:.0%} clear, >= {WEAK_SHARE:.0%} weak), `{args.results.name}`.",
        "",
    ]
    points = {}
    for method in METHODS:
        cs = cells(rows, method)
        points[method] = cs
        agree = sum(c["forecast"] == c["measured"] for c in cs)
        lines += [
            f"**{method}**: the verdict agrees in {agree} of {len(cs)} cells "
            f"({agree / len(cs):.0%})",
            "",
            "| n | epsilon | SNR | forecast | share (± spread) | measured |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['n']} | {c['epsilon']:g} | {c['snr']:.2f} | {c['forecast']} | "
            f"{c['share']:.2f} ± {c['spread']:.2f} | {c['measured']} |"
            for c in cs
        ]
        lines.append("")
    text = "\n".join(lines)
    (args.results / "forecast_check.md").write_text(text)
    plot(points, args.results / "forecast_check.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
