"""The whole paper-protocol audit on one architecture: wall time and its ratio to the ideal.

    python benchmarks/bench_audit.py --arch ddpm-cifar10 --precision tf32            # the paper's protocol
    python benchmarks/bench_audit.py --arch tiny-16 --samples 8 --points 128 --times 10  # scaled down

The paper's protocol: 10 time points × 3 loop types (rotation, projection, Brownian) × 256 samples ×
1,000 nodes, plus the 64×64 sub-Jacobian curl, with x0 drawn from the model (DPM-Solver++(2M), 50
steps), each unit also run on the Gaussian control field. The ideal time is the model evaluations the
audit makes (forward-pass equivalents: loop nodes, Jacobian products, sampler steps) times the bare
network's forward time per sample, measured in the same process after the audit; the ratio ideal /
wall is 1.0 for an audit that costs nothing beyond its model evaluations (target: the whole protocol
on ddpm-cifar10 under 3 minutes on one H100).
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
from common import (
    forward_seconds,
    network,
    parser,
    peak_memory_gib,
    print_table,
    reset_peak_memory,
    write_json,
)

from conservcheck.runner.audit import audit


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=256, help="samples per time point (paper: 256)")
    p.add_argument("--points", default="1000", help="nodes per loop, or auto (paper: 1000)")
    p.add_argument("--times", type=int, default=10, help="time points, evenly spaced DDPM indices 10 … 990")
    p.add_argument("--paths", default="rotation,projection,brownian")
    p.add_argument("--curl", default="subjacobian", help="none, subjacobian, hutchinson or both")
    p.add_argument("--sampler-steps", type=int, default=50, help="steps of the sampler that draws x0")
    args = p.parse_args()
    probe, batch, env, head = network(args, "bench_audit")
    indices = [int(k) for k in np.linspace(10, 990, args.times).round()]
    points = args.points if args.points == "auto" else int(args.points)
    print(
        f"{head} | {args.times} time points × {args.paths} × {args.samples} samples × {points} nodes "
        f"+ curl {args.curl} | x0: {args.sampler_steps}-step sampler"
    )
    forward_seconds(probe, batch, 1)
    reset_peak_memory(probe.device)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        report = audit(
            probe,
            time_indices=indices,
            n_samples=args.samples,
            n_points=points,
            paths=args.paths,
            curl=args.curl,
            batch_size=batch,
            seed=args.seed,
            sampler_steps=args.sampler_steps,
            cache_dir=cache,
        )
        seconds = time.perf_counter() - t0
    peak = peak_memory_gib(probe.device)
    model_units = [u for u in report.units if u["field"] == "model"]
    unit_evals = sum(int(u.get("meta", {}).get("n_evals", 0)) for u in model_units)
    sampling = args.samples * args.sampler_steps
    evals = unit_evals + sampling
    calls = max(1, min(64, round(evals / batch)))
    fwd = min(forward_seconds(probe, batch, calls)[0] for _ in range(max(1, args.repeats)))
    ideal = evals * fwd
    statuses = sorted({u["status"] for u in report.units})
    row = {
        "arch": args.arch,
        "precision": args.precision,
        "times": args.times,
        "samples": args.samples,
        "points": str(points),
        "curl": args.curl,
        "batch": batch,
        "units": len(report.units),
        "evals": evals,
        "sampling_evals": sampling,
        "seconds": seconds,
        "forward_rate": 1 / fwd,
        "ideal_seconds": ideal,
        "ratio": ideal / seconds,
        "peak_gib": peak,
        "verdict": str(report.verdict).split(":")[0],
        "statuses": ",".join(statuses),
    }
    print_table(
        [row],
        [
            ("units", "units", "d"),
            ("evals", "model evals", ","),
            ("seconds", "wall s", ".1f"),
            ("forward_rate", "forward/s", ",.1f"),
            ("ideal_seconds", "ideal s", ".1f"),
            ("ratio", "ideal / wall", ".3f"),
            ("peak_gib", "peak GiB", ".2f"),
            ("verdict", "verdict", ""),
            ("statuses", "unit status", ""),
        ],
    )
    print(
        f"\nratio ideal / wall: {row['ratio']:.3f}; wall time {seconds / 60:.2f} min "
        f"(target for the full protocol on ddpm-cifar10: < 3 min on one H100)"
    )
    write_json(args.json, "audit", args, env, [row])


if __name__ == "__main__":
    main()
