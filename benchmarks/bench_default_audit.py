"""Where the time of the default audit goes: ``conservcheck.audit(model)`` with nothing else, phase by phase.

    python benchmarks/bench_default_audit.py --threads 1     # the load-robust breakdown (process CPU time)
    python benchmarks/bench_default_audit.py                 # torch's default threads: what a user waits

Runs the default audit of ``--model`` (embedded:digits) in an empty cache folder — so x0 is drawn by the
model's sampler, as on a first run — and times each phase in wall and process CPU seconds: loading,
the contract check (and the plan's forward timing where the audit has one), drawing x0, each loop type,
the curl. Unit boundaries come from the audit's progress callback, so the script runs unchanged on any
version that has one (to compare with an earlier commit, put its tree first on PYTHONPATH). The Jacobian
strategy checks inside the curl units are timed on their own afterwards, at the audit's time points.

With ``--threads 1`` the CPU seconds hardly change with other processes on the machine; wall seconds
with two threads are what a user of a quiet 2-core machine waits.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict

import torch

from conservcheck.contract import check_probe
from conservcheck.geometry.jacobian import select_strategy
from conservcheck.runner.audit import audit, load
from conservcheck.timepoints import forward_samples, time_points


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:digits")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", help="append the result as one JSON line to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    marks: list[tuple[str, float, float]] = []
    last = [time.perf_counter(), time.process_time()]

    def progress(done: float, total: float, description: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        marks.append((description, now - last[0], cpu - last[1]))
        last[:] = [now, cpu]

    with tempfile.TemporaryDirectory() as cache:
        t0, c0 = time.perf_counter(), time.process_time()
        last[:] = [t0, c0]
        report = audit(args.model, progress=progress, cache_dir=cache)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    phases: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    # The time up to a callback is charged to the unit it names (a unit's callback comes when it finishes;
    # one also comes as it starts, after a negligible gap); the time up to "drawing x0" is loading and
    # the checks, and the time up to "x0 drawn" the sampler (earlier versions have no such callback:
    # there the sampler's time is in the first unit's).
    for description, w, c in marks:
        if description.startswith("drawing x0"):
            name = "load, contract check, plan"
        elif description.startswith("x0 drawn"):
            name = "x0 (model sampler)"
        else:
            name = _phase(description)
        phases[name][0] += w
        phases[name][1] += c
    phases["report"] = [wall - sum(v[0] for v in phases.values()), cpu - sum(v[1] for v in phases.values())]

    probe = load(args.model, device="cpu")
    c1 = time.process_time()
    check_probe(probe)
    contract_cpu = time.process_time() - c1
    x0 = torch.zeros(2, *probe.sample_shape, dtype=probe.dtype)
    c1 = time.process_time()
    for tp in time_points(probe, None, None, None):
        x_t, _ = forward_samples(x0.double(), tp, 0)
        select_strategy(probe.score, x_t.to(probe.dtype), torch.tensor(tp.t, dtype=torch.float64))
    strategy_cpu = time.process_time() - c1

    print(f"{args.model}, {torch.get_num_threads()} threads: wall {wall:.1f} s, process CPU {cpu:.1f} s")
    print(f"verdict: {report.verdict}")
    print("\n| phase | wall s | CPU s |\n|---|---:|---:|")
    for name, (w, c) in phases.items():
        print(f"| {name} | {w:.1f} | {c:.1f} |")
    print(f"\ncontract check alone: {contract_cpu:.2f} CPU s; Jacobian strategy checks (inside the curl units, one per")
    print(f"time point): {strategy_cpu:.2f} CPU s")
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            row = {
                "model": args.model,
                "threads": torch.get_num_threads(),
                "wall_s": wall,
                "cpu_s": cpu,
                "phases": dict(phases),
                "contract_cpu_s": contract_cpu,
                "strategy_cpu_s": strategy_cpu,
                "verdict": str(report.verdict),
                "run": report.run,
            }
            f.write(json.dumps(row) + "\n")


def _phase(description: str) -> str:
    """``loop.rotation model k10`` → ``loop.rotation (model)``; the control's units are their own phase."""
    parts = description.split()
    return f"{parts[0]} ({parts[1]})" if len(parts) >= 2 else description


if __name__ == "__main__":
    main()
