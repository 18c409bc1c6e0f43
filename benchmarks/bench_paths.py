"""Path-integral throughput as a ratio to the model's raw batched forward throughput.

    python benchmarks/bench_paths.py --arch ddpm-cifar10 --precision tf32 --samples 256 --points 1000

For each loop type, model evaluations per second spent inside ``loop_diagnostic`` (loop construction,
batching, score conversion and float64 quadrature included) divided by the forward throughput of the
bare network at the same batch size, device and precision. 1.0 means the loops run at the speed of the
model itself (target on an H100/H200: ≥ 0.9). Peak memory is torch's peak allocation on CUDA and the
process's peak resident memory on the CPU.
"""

from __future__ import annotations

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
from conservcheck.diagnostics.loop_integral import loop_diagnostic


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=8, help="loops per loop type (paper: 256)")
    p.add_argument("--points", type=int, default=128, help="nodes per loop (paper: 1000)")
    p.add_argument("--paths", default="rotation,projection,brownian")
    p.add_argument("--index", type=int, default=500, help="DDPM time index k of the loops")
    args = p.parse_args()
    probe, batch, env, head = network(args, "bench_paths")
    timer = Interleaved(probe, batch, args.repeats)
    tp = time_point(probe, args.index)
    x0 = clean_samples(probe, args.samples, args.seed)
    print(
        f"{head} | {args.samples} loops × {args.points} nodes | k = {args.index}"
        f"{' | torch.compile' if args.compile else ''}"
    )
    rows = []
    for path in args.paths.split(","):
        batcher = Batcher(batch, probe)
        reset_peak_memory(probe.device)
        t = timer.measure(
            lambda: loop_diagnostic(probe, x0, tp, seed=args.seed, batcher=batcher, path=path, n_points=args.points),
            lambda r: r.meta["n_evals"],
        )
        rows.append(
            {
                "arch": args.arch,
                "precision": args.precision,
                "path": path,
                "batch": batch,
                "samples": args.samples,
                "points": args.points,
                "evals": t.evals,
                "seconds": t.seconds,
                "rate": t.evals / t.seconds,
                "forward_rate": 1 / t.forward,
                "ratio": t.ratio,
                "cpu_ratio": t.cpu_ratio,
                "peak_gib": peak_memory_gib(probe.device),
            }
        )
    print_table(
        rows,
        [
            ("path", "loop", ""),
            ("evals", "evaluations", ","),
            ("seconds", "wall s", ".2f"),
            ("rate", "evals/s", ",.1f"),
            ("forward_rate", "forward/s", ",.1f"),
            ("ratio", "ratio", ".3f"),
            ("cpu_ratio", "CPU-time ratio", ".3f"),
            ("peak_gib", "peak GiB", ".2f"),
        ],
    )
    worst = min(r["ratio"] for r in rows)
    print(f"\nratio (worst loop type): {worst:.3f} (target ≥ 0.9 on an H100/H200)")
    write_json(args.json, "paths", args, env, rows)


if __name__ == "__main__":
    main()
