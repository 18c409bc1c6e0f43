"""Curl: Hutchinson's full-Jacobian estimator against the paper's 64×64 sub-Jacobian, same samples.

    python benchmarks/bench_curl.py --arch ddpm-cifar10 --precision fp32 --samples 64

Both estimators run at the same forward samples x_t. Per estimator: wall time, cost per sample in
forward-pass equivalents (counted: the meta's n_evals / samples; measured: wall time / the bare
network's forward time per sample, measured in the same process), and the uncertainty of the relative
asymmetry ‖J − Jᵀ‖_F / (2‖J‖_F):

* ``across-sample CI``: width of the 95% Student-t interval of its mean over the samples;
* ``per-sample CI``: Hutchinson's median jackknife interval width (the sub-Jacobian has none: its
  block is exact, but it sees only |S|² of the D² entries).

The sub-Jacobian's relative asymmetry is that of its block: with c = ‖C‖_F / ‖J_SS + J_SSᵀ‖_F,
‖C‖_F / (2‖J_SS‖_F) = c / √(1 + c²), since the symmetric and antisymmetric parts are orthogonal.
"""

from __future__ import annotations

import math

import torch
from common import (
    Interleaved,
    clean_samples,
    network,
    parser,
    peak_memory_gib,
    print_table,
    reset_peak_memory,
    time_point,
    write_json,
)

from conservcheck.batching import Batcher
from conservcheck.diagnostics.curl import curl_hutchinson, curl_subjacobian, t_quantile

Z95 = 1.959963984540054


def across_ci(values: torch.Tensor) -> tuple[float, float]:
    """(mean, width of its 95% Student-t interval) of per-sample values [B]."""
    b = values.numel()
    if b < 2:
        return float(values.mean()), math.nan
    return float(values.mean()), 2 * t_quantile(Z95, b - 1) * float(values.std()) / math.sqrt(b)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=4, help="samples (paper: 256)")
    p.add_argument("--block", type=int, default=64, help="sub-Jacobian block |S| (paper: 64)")
    p.add_argument("--probes", type=int, default=16, help="Hutchinson probes per sample")
    p.add_argument("--strategy", default="auto", help="Jacobian strategy: auto, jvp, double_vjp, fd")
    p.add_argument("--index", type=int, default=500, help="DDPM time index k")
    args = p.parse_args()
    probe, batch, env, head = network(args, "bench_curl")
    timer = Interleaved(probe, batch, args.repeats)
    tp = time_point(probe, args.index)
    x0 = clean_samples(probe, args.samples, args.seed)
    print(f"{head} | {args.samples} samples | k = {args.index}")
    runs = {
        "subjacobian": lambda: curl_subjacobian(
            probe, x0, tp, seed=args.seed, batcher=Batcher(batch, probe), block=args.block, strategy=args.strategy
        ),
        "hutchinson": lambda: curl_hutchinson(
            probe, x0, tp, seed=args.seed, batcher=Batcher(batch, probe), n_probes=args.probes, strategy=args.strategy
        ),
    }
    rows = []
    for name, run in runs.items():
        reset_peak_memory(probe.device)
        t = timer.measure(run, lambda r: r.meta["n_evals"])
        res = t.result
        if name == "subjacobian":
            c = res.values["curl_rel_fro"]
            rel = c / (1 + c**2).sqrt()
            per_sample = None
            setting = f"block {res.meta['block']}×{res.meta['block']}"
        else:
            rel = res.values["rel_asym"]
            per_sample = float((res.values["rel_asym_ci_high"] - res.values["rel_asym_ci_low"]).median())
            setting = f"{args.probes} probes"
        mean, width = across_ci(rel)
        rows.append(
            {
                "arch": args.arch,
                "precision": args.precision,
                "estimator": name,
                "setting": setting,
                "strategy": res.meta["strategy"],
                "samples": args.samples,
                "seconds": t.seconds,
                "evals": t.evals,
                "fpe_counted": t.evals / args.samples,
                "fpe_measured": t.seconds / t.forward / args.samples,
                "forward_rate": 1 / t.forward,
                "rel_asym": mean,
                "ci_across": width,
                "ci_per_sample": per_sample,
                "peak_gib": peak_memory_gib(probe.device),
            }
        )
    print_table(
        rows,
        [
            ("estimator", "estimator", ""),
            ("setting", "setting", ""),
            ("strategy", "strategy", ""),
            ("seconds", "wall s", ".2f"),
            ("fpe_counted", "fwd-eq/sample (counted)", ".0f"),
            ("fpe_measured", "fwd-eq/sample (measured)", ".1f"),
            ("rel_asym", "mean rel. asym.", ".4f"),
            ("ci_across", "across-sample CI", ".4f"),
            ("ci_per_sample", "per-sample CI", ".4f"),
            ("peak_gib", "peak GiB", ".2f"),
        ],
    )
    sub, hut = rows
    print(f"\nforward throughput (bare network, batch {batch}): {sub['forward_rate']:,.1f} samples/s")
    print(f"ratio of wall times, Hutchinson / sub-Jacobian: {hut['seconds'] / sub['seconds']:.3f}")
    write_json(args.json, "curl", args, env, rows)


if __name__ == "__main__":
    main()
