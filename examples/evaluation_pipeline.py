"""Audit a list of checkpoints with the same settings and print one table.

    python examples/evaluation_pipeline.py                                  # the two embedded models
    python examples/evaluation_pipeline.py ./run-a/checkpoint-5000 ./run-b google/ddpm-cifar10-32

Each row is one checkpoint: the verdict, and per metric the largest median over the audited time points
(Eq. 7 loop ratio over rotation loops, mean |∂ᵢsⱼ − ∂ⱼsᵢ| on a random sub-Jacobian block).
"""

import sys

import pandas as pd

from conservcheck.audit import audit

checkpoints = sys.argv[1:] or ["embedded:digits", "embedded:funnel"]
rows = []
for ref in checkpoints:
    report = audit(ref, paths="rotation", curl="subjacobian", n_samples=16, n_points=64, seed=0)
    medians = report.summary().pivot_table(index="metric", values="median", aggfunc="max")["median"]
    rows.append({"checkpoint": ref, "status": report.verdict.status,
                 "max |Eq. 7|": medians.get("abs_eq7"), "max curl": medians.get("curl_mean_abs"),
                 "seconds": report.run.get("wall_time_s")})
print(pd.DataFrame(rows).to_string(index=False, float_format="{:.3g}".format))
