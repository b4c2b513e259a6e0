"""Calibration timings per accounting mode (issue target: calibrate() < 0.5 s in every mode).

Each case is timed cold (accountant caches cleared first) and repeated; the script prints the
median wall time, the median CPU time of this process (less sensitive to other load on the
machine) and the load average, then the slowest case per mode and whether it meets the target.
Also times one cold epsilon_for() per case.

Run: .venv/bin/python bench/calibrate_timing.py [--repeats 3] [--targets 0.5,1,4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from dpagg_core.privacy import accountant, calibration

TARGET_S = 0.5
DELTA_N = 1000  # n; delta = 1 / (10 n)

# (mode label, calibrate kwargs) - typical DPAgg settings for each row of the accounting table.
CASES: list[tuple[str, dict]] = [
    ("full k=1", {"sampling": "full"}),
    ("full k=10", {"sampling": "full", "releases": 10}),
    ("wor k=1 (m=100)", {"sampling": "wor", "m": 100}),
    ("wor k=1 (m=500)", {"sampling": "wor", "m": 500}),
    ("wor k=10 (m=100)", {"sampling": "wor", "m": 100, "releases": 10}),
    ("wor k=5 (m=500)", {"sampling": "wor", "m": 500, "releases": 5}),
    ("poisson k=1 (q=0.1)", {"sampling": "poisson", "q": 0.1}),
    ("poisson k=10 (q=0.5)", {"sampling": "poisson", "q": 0.5, "releases": 10}),
    ("poisson k=100 (q=0.1)", {"sampling": "poisson", "q": 0.1, "releases": 100}),
]  # replace-one only: dpagg refuses add/remove adjacency (accountant module docstring)


def _cold(fn) -> tuple[float, float]:
    accountant.clear_caches()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--targets", default="0.5,1,4", help="target epsilons, comma separated")
    args = parser.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    n, delta = DELTA_N, 1.0 / (10 * DELTA_N)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"n={n} delta={delta:g}; load average {load:.2f} on {os.cpu_count()} CPUs")
    header = (
        f"{'mode':34s} {'eps*':>5s} {'z':>9s} {'eps':>9s} {'accountant':44s} "
        f"{'wall s':>7s} {'cpu s':>7s} {'eps_for s':>9s}"
    )
    print(header)
    worst: dict[str, float] = {}
    for label, kw in CASES:
        for target in targets:
            walls, cpus = [], []
            plan = None
            for _ in range(args.repeats):
                plan = None

                def run(kw=kw, target=target) -> None:
                    nonlocal plan
                    plan = calibration.calibrate(target, delta, n, **kw)

                w, c = _cold(run)
                walls.append(w)
                cpus.append(c)
            assert plan is not None and plan.epsilon <= target
            z = plan.noise_multiplier
            w_eval, _ = _cold(lambda kw=kw, z=z: accountant.epsilon_for(z, delta, n, **kw))
            wall, cpu = statistics.median(walls), statistics.median(cpus)
            mode = label.split(" ")[0]
            worst[mode] = max(worst.get(mode, 0.0), cpu)
            print(
                f"{label:34s} {target:5g} {z:9.4f} {plan.epsilon:9.5f} {plan.accountant:44s} "
                f"{wall:7.3f} {cpu:7.3f} {w_eval:9.3f}"
            )
    print()
    print(f"slowest calibrate per mode (median CPU s; target < {TARGET_S} s):")
    for mode, cpu in worst.items():
        print(f"  {mode:20s} {cpu:6.3f}  {'ok' if cpu < TARGET_S else 'SLOW'}")


if __name__ == "__main__":
    main()
