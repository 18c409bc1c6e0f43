"""Peak memory of the curl and loop engines at latent sizes (SD 1.x 4×64×64, SD3 16×128×128).

Each measurement runs in a fresh process on one sample of a cheap field, s(x) = −tanh(x) + 0.3 K x (K the
cyclic difference along the width), so what is measured is the engine's own memory, not a network's:
the 64×64 sub-Jacobian (64 products in one batch), Hutchinson's estimator (4 probes) and one rotation
loop of ``--points`` nodes. Peak resident memory (CPU) or peak allocated memory (CUDA), above the process's
start, in GiB:

    python benchmarks/bench_latent_memory.py --shapes 4x64x64,16x128x128 --points 128
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _measure(engine: str, shape: tuple[int, ...], points: int, device: str) -> dict:
    import torch

    from conservcheck.batching import Batcher
    from conservcheck.diagnostics.curl import curl_hutchinson, curl_subjacobian
    from conservcheck.diagnostics.loop_integral import loop_diagnostic
    from conservcheck.probe import VectorFieldProbe
    from conservcheck.timepoints import TimePoint

    def field(x, t):
        return -torch.tanh(x) + 0.3 * (torch.roll(x, -1, -1) - torch.roll(x, 1, -1))

    probe = VectorFieldProbe(field, sample_shape=shape, dtype=torch.float32, device=device)
    x0 = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)).to(device) * 0.5
    time_point = TimePoint.from_t(probe.process, 0.5)
    cuda = device.startswith("cuda")
    start = torch.cuda.memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if engine == "subjacobian":
        curl_subjacobian(probe, x0, time_point, seed=0, batcher=Batcher(64), block=64)
    elif engine == "hutchinson":
        curl_hutchinson(probe, x0, time_point, seed=0, batcher=Batcher(64), n_probes=4)
    else:
        loop_diagnostic(probe, x0, time_point, seed=0, batcher=Batcher(256), path="rotation", n_points=points)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"extra_gib": (peak - start) / 2**30, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4x64x64,16x128x128", help="latent shapes C x H x W, comma-separated")
    parser.add_argument("--points", type=int, default=128, help="nodes of the rotation loop")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="append one JSON line per row to this file")
    parser.add_argument("--one", nargs=2, metavar=("ENGINE", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        shape = tuple(int(v) for v in args.one[1].split("x"))
        print(json.dumps(_measure(args.one[0], shape, args.points, args.device)))
        return 0
    print("| shape | D | engine | extra peak memory (GiB) | seconds |")
    print("|---|---:|---|---:|---:|")
    for text in args.shapes.split(","):
        shape = tuple(int(v) for v in text.split("x"))
        d = shape[0] * shape[1] * shape[2]
        for engine in ("subjacobian", "hutchinson", f"loop ({args.points} nodes)"):
            name = engine.split(" ")[0]
            cmd = [sys.executable, __file__, "--one", name, text, "--points", str(args.points), "--device", args.device]
            out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            print(f"| {text} | {d:,} | {engine} | {out['extra_gib']:.2f} | {out['seconds']:.1f} |")
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"shape": text, "engine": engine, "device": args.device, **out}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
