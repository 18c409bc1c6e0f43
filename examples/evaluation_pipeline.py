"""Audit a list of checkpoints with the same settings and print one table (and write it as Markdown).

    python examples/evaluation_pipeline.py                                  # the two embedded models
    python examples/evaluation_pipeline.py ./run-a/checkpoint-5000 ./run-b google/ddpm-cifar10-32
    python examples/evaluation_pipeline.py --samples 4 --points 32 --out table.md     # a quick look

One row per checkpoint: the verdict, the largest ratio of a check's median to its numerical floor, and
per metric the largest median over the audited time points (Eq. 7 loop ratio over rotation loops, mean
|∂ᵢsⱼ − ∂ⱼsᵢ| on a random 64×64 sub-Jacobian block). Every audit uses seed 0, so rows are comparable
and a re-run gives the same numbers. Needs no extra; writes only the ``--out`` file, when given.
"""

import argparse

import pandas as pd

import conservcheck

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("checkpoints", nargs="*", default=["embedded:digits", "embedded:funnel"])
parser.add_argument("--samples", type=int, default=16, help="samples per time point")
parser.add_argument("--points", type=int, default=None, help="nodes per loop (default: the audit's own)")
parser.add_argument("--out", help="also write the table to this Markdown file")
args = parser.parse_args()

rows = []
for ref in args.checkpoints:
    report = conservcheck.audit(
        ref, paths="rotation", curl="subjacobian", n_samples=args.samples, n_points=args.points, seed=0
    )
    medians = report.summary().pivot_table(index="metric", values="median", aggfunc="max")["median"]
    rows.append(
        {
            "checkpoint": ref,
            "verdict": report.verdict.status,
            "worst / floor": max((c["ratio"] or 0.0) for c in report.verdict.checks),
            "max Eq. 7": medians.get("abs_eq7"),
            "max curl": medians.get("curl_mean_abs"),
            "seconds": report.run.get("wall_time_s"),
        }
    )
table = pd.DataFrame(rows)
print(table.to_string(index=False, float_format="{:.3g}".format))
if args.out:
    cells = table.map(lambda v: f"{v:.3g}" if isinstance(v, float) else f"`{v}`" if v in args.checkpoints else str(v))
    lines = ["| " + " | ".join(table.columns) + " |", "|---" * len(table.columns) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells.itertuples(index=False)]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(f"# Conservativity of {len(rows)} checkpoints\n\n" + "\n".join(lines) + "\n")
