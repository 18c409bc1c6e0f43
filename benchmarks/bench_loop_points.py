"""How many nodes each loop type needs: the verdict's view of one loop type at N, N/2, N/4, … nodes.

    python benchmarks/bench_loop_points.py --paths rotation:96,projection:256,brownian:1024,rectangle:128 --threads 1

For each time point of the default audit (the audit's own x0: 32 model samples, seed 0) and each loop
type, one evaluation of the model and the Gaussian control at N_max nodes per loop gives the loops at
every N = N_max / 2^j that are nested in it — every rule is nested under doubling, and the Brownian bridge
at N is every second node of the bridge at 2N — so the table costs one audit unit at N_max. Per (loop,
k, N): the model's median |∮ s·dy| / ∮|s||dy| (the verdict's headline metric), the control's median, the
quadrature floor (median of the nested-rule error / ∮|s||dy|), the floor the verdict uses (the largest of
those and the precision floor) and median / floor: above 10 the check resolves the loop, at or below it
cannot tell the model from a conservative field.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from conservcheck.batching import Batcher, evaluate
from conservcheck.geometry.loops import loop_sums, make_loops
from conservcheck.precision import floor_rel
from conservcheck.report.verdict import FLOOR_FACTOR
from conservcheck.runner.audit import load
from conservcheck.runner.units import control_probe
from conservcheck.timepoints import time_points
from conservcheck.x0.model_samples import model_samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:digits")
    p.add_argument("--paths", default="rotation:96,projection:256,brownian:1024", help="loop:N_max, comma-separated")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", help="append one JSON line per row to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    probe = load(args.model, device="cpu")
    batcher = Batcher(256, probe)
    x0, _ = model_samples(probe, args.samples, 0, steps=50, batcher=batcher)
    fields = {"model": probe, "control": control_probe(probe, x0)}
    precision_floor = floor_rel(probe.precision)
    rows = []
    for item in args.paths.split(","):
        path, n_max = item.split(":")
        start = time.perf_counter()
        for tp in time_points(probe, None, None, None):
            full = make_loops(path, x0, tp, 0, n_points=int(n_max))
            t = torch.tensor(tp.t, dtype=torch.float64)
            scores = {
                name: evaluate(f, full.points.reshape(-1, *probe.sample_shape), t, batcher=batcher).reshape(
                    full.points.shape
                )
                for name, f in fields.items()
            }
            n, step = full.n_points, 1
            while n >= 16:
                loops = make_loops(path, x0, tp, 0, n_points=n)
                if loops.points.shape == full.points[:, ::step].shape:  # nested (not so for odd nodes per edge)
                    stats = {}
                    for name, s in scores.items():
                        sums = loop_sums(s[:, ::step], loops)
                        scale = sums["abs_score_length"]
                        # medians as the report takes them (the mean of the middle two of an even count)
                        stats[name] = (
                            float(torch.quantile((sums["circulation"] / scale).abs(), 0.5)),
                            float(
                                torch.quantile((sums["circulation"] - sums["circulation_coarse"]).abs() / scale, 0.5)
                            ),
                        )
                    median, quad = stats["model"]
                    floor = max(stats["control"][0], quad, precision_floor)
                    rows.append(
                        {
                            "loop": path,
                            "k": tp.index if tp.index is not None else tp.t,
                            "nodes": n,
                            "median": median,
                            "control": stats["control"][0],
                            "quadrature": quad,
                            "floor": floor,
                            "ratio": median / floor,
                        }
                    )
                n, step = n // 2, step * 2
        print(f"{path}: {time.perf_counter() - start:.0f} s", flush=True)
    print("\n| loop | k | nodes | model median | control | quadrature floor | median / floor | resolved |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in sorted(rows, key=lambda r: (r["loop"], r["nodes"], r["k"])):
        print(
            f"| {r['loop']} | {r['k']} | {r['nodes']} | {r['median']:.3g} | {r['control']:.2g} | "
            f"{r['quadrature']:.3g} | {r['ratio']:.3g} | {'yes' if r['ratio'] > FLOOR_FACTOR else 'no'} |"
        )
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"model": args.model, **r}) + "\n")


if __name__ == "__main__":
    main()
