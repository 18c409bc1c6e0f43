"""Reproducibility: how far an audit's numbers move with the batch size, the loop chunking and the CPU threads.

    python benchmarks/bench_reproducibility.py --samples 4                      # every field, fp64 and fp32
    python benchmarks/bench_reproducibility.py --fields digits --precisions fp32 --samples 4

Each field is audited on fixed x0 (an .npy file, so every run reads the same bits) at a reference setting
(batch size 64, no memory budget, 1 CPU thread) and again under each variation: batch sizes 1, 3 and 7,
a memory budget that holds one loop at a time (model calls of one loop's nodes instead of 64 rows), 2
threads, and 2 threads with batch size 7. The audit runs rotation, projection and Brownian loops and
both curl estimators at two time points. Fields: the exact score of a Gaussian mixture (conservative,
element-wise), the gradient of a quadratic through a matrix product (conservative: its metrics are
rounding noise that changes with the kernel), a linear field with an antisymmetric part (a matrix
product; not conservative), the same computed through NumPy (autodiff cannot see through it, so the curl
uses central differences), and the embedded funnel MLP and digits UNet.

Printed per precision, field and variation, over the headline metrics (``abs_circulation_ratio``,
``curl_rel_fro``, ``rel_asym``: scale-free) of the model's and the control's units, per sample and for
every summary statistic (median, quartiles, mean, bootstrap CI — what the verdict and the gates read):

* ``rel`` — the largest |a − b| / |a| where |a| is above the precision floor;
* ``noise`` — the largest |a − b| where |a| is at or below the floor (there a value is rounding noise,
  and only its absolute deviation means anything);
* ``abs`` — the largest |a − b| of all;
* ``of bound`` — the largest |a − b| / (rtol·|a| + atol) under the promised tolerance (must stay < 1);
* ``ratio rel`` — the largest relative change of a verdict check's ratio (median / floor);
* ``verdict`` — whether the verdict (status and every check's status) is unchanged;
* ``bits`` — whether the whole report (except its ``run`` object and the thread count it records) is
  bit-identical.

For the embedded models it also draws x0 from the model's own sampler at batch size 64 and at half the
sample count, and prints the largest deviation of the samples relative to their largest magnitude (the
sampler integrates an ODE over ``--sampler-steps`` model calls, carrying a rounding difference along).

:data:`conservcheck.report.reproducibility.TOLERANCE` states the bound the documentation promises; the
summary prints it beside the largest deviations per precision.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import describe, environment, print_table, write_json

from conservcheck import OUProcess, VectorFieldProbe, diagnostics
from conservcheck.analytic.fields import GaussianMixture, LinearField
from conservcheck.batching import Batcher
from conservcheck.diagnostics.loop_integral import loop_bytes_per_element
from conservcheck.precision import PRECISIONS, storage_dtype
from conservcheck.report.reproducibility import TOLERANCE, Tolerance, tolerance
from conservcheck.runner.audit import audit, load
from conservcheck.x0.model_samples import sample

FIELDS = ("mixture", "quadratic", "linear", "linear-fd", "funnel", "digits")
REFERENCE = {"batch_size": 64, "threads": 1, "memory_budget": None}
VARIATIONS = {
    "batch 1": {"batch_size": 1},
    "batch 3": {"batch_size": 3},
    "batch 7": {"batch_size": 7},
    "1 loop at a time": {"memory_budget": "one loop"},
    "2 threads": {"threads": 2},
    "2 threads, batch 7": {"threads": 2, "batch_size": 7},
}
ANALYTIC_DIM = 32


def _mixture_probe(dtype: torch.dtype) -> VectorFieldProbe:
    """The exact score of a 3-component Gaussian mixture (conservative: its headline metrics are rounding)."""
    g = torch.Generator().manual_seed(0)
    gm = GaussianMixture(torch.randn(3, ANALYTIC_DIM, generator=g, dtype=torch.float64) * 0.7, 0.4)
    return VectorFieldProbe(
        gm.score, process=OUProcess(), sample_shape=(ANALYTIC_DIM,), data_range=(-5.0, 5.0), dtype=dtype
    )


def _quadratic_probe(dtype: torch.dtype) -> VectorFieldProbe:
    """s = −(1 + t) A x with A symmetric positive definite: conservative, through a matrix product, so its
    headline metrics are rounding noise that changes with the kernel (what atol has to cover)."""
    g = torch.Generator().manual_seed(3)
    m = torch.randn(ANALYTIC_DIM, ANALYTIC_DIM, generator=g, dtype=torch.float64) / math.sqrt(ANALYTIC_DIM)
    a = m @ m.T + 0.5 * torch.eye(ANALYTIC_DIM, dtype=torch.float64)
    lin = LinearField(-a, torch.zeros_like(a))
    return VectorFieldProbe(
        lambda x, t: lin(x) * (1 + t)[:, None],
        process=OUProcess(),
        sample_shape=(ANALYTIC_DIM,),
        data_range=(-5.0, 5.0),
        dtype=dtype,
    )


def _linear_probe(dtype: torch.dtype) -> VectorFieldProbe:
    """s = (1 + t) A x with A = −I + K, K antisymmetric of norm ≈ 0.3: a matrix product, not conservative."""
    g = torch.Generator().manual_seed(1)
    k = torch.randn(ANALYTIC_DIM, ANALYTIC_DIM, generator=g, dtype=torch.float64) * 0.3 / math.sqrt(ANALYTIC_DIM)
    lin = LinearField(-torch.eye(ANALYTIC_DIM, dtype=torch.float64), k - k.T)
    return VectorFieldProbe(
        lambda x, t: lin(x) * (1 + t)[:, None],
        process=OUProcess(),
        sample_shape=(ANALYTIC_DIM,),
        data_range=(-5.0, 5.0),
        dtype=dtype,
    )


def _numpy_probe(probe: VectorFieldProbe) -> VectorFieldProbe:
    """The same field computed through NumPy: autodiff cannot see through it, so the curl falls back to
    central differences (the ``fd`` strategy), whose step divides the forward pass's rounding."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(probe.score(torch.from_numpy(x.detach().numpy()), t).numpy())

    return VectorFieldProbe(
        fn, process=probe.process, sample_shape=probe.sample_shape, data_range=probe.data_range, dtype=probe.dtype
    )


def probe_for(field: str, precision: str, device: str) -> VectorFieldProbe:
    dtype = storage_dtype(precision)
    if field == "mixture":
        probe = _mixture_probe(dtype)
    elif field == "quadratic":
        probe = _quadratic_probe(dtype)
    elif field == "linear":
        probe = _linear_probe(dtype)
    elif field == "linear-fd":
        probe = _numpy_probe(_linear_probe(dtype))
    else:
        return load(f"embedded:{field}", device=device, precision=precision)
    probe.precision = precision
    return probe  # the analytic fields run on the CPU


def clean_samples(field: str, probe: VectorFieldProbe, n: int, steps: int) -> np.ndarray:
    """x0 for the audits: the model's own samples for an embedded model, Gaussian data otherwise."""
    if field in ("mixture", "quadratic", "linear", "linear-fd"):
        return (torch.randn(n, ANALYTIC_DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)).numpy()
    torch.set_num_threads(1)
    # The sampler does not clip; the audit reads data inside the model's range.
    return sample(probe, n, seed=0, steps=steps, batcher=Batcher(64)).double().cpu().clamp(*probe.data_range).numpy()


def headline_metrics() -> set[str]:
    return {m for spec in diagnostics.registered().values() for m in spec.headline.values()}


def run_audit(probe: VectorFieldProbe, data: str, setting: dict[str, Any], args: argparse.Namespace) -> dict:
    torch.set_num_threads(setting["threads"])
    budget = setting["memory_budget"]
    if budget == "one loop":
        budget = args.points * math.prod(probe.sample_shape) * loop_bytes_per_element(probe.dtype)
    with tempfile.TemporaryDirectory() as cache:
        report = audit(
            probe,
            paths="rotation,projection,brownian",
            curl="both",
            block=args.block,
            n_probes=args.probes,
            times=args.times,
            n_samples=args.samples,
            n_points=args.points,
            data=data,
            batch_size=setting["batch_size"],
            memory_budget=budget,
            cache_dir=cache,
        )
    data_out = json.loads(json.dumps(report.to_dict(), allow_nan=True))
    data_out.pop("run")
    data_out["environment"].pop("cpu_threads")  # recorded, and expected to differ
    return data_out


def _headline_values(report: dict, metrics: set[str]) -> dict[tuple, float]:
    """(field, diagnostic, variant, time, sample) → headline value, from the per-sample rows."""
    cols = report["rows"]["columns"]
    at = {c: i for i, c in enumerate(cols)}
    out = {}
    for row in report["rows"]["data"]:
        metric = diagnostics.headline_metric(row[at["diagnostic"]], row[at["variant"]])
        if metric in metrics and row[at[metric]] is not None:
            key = (row[at["field"]], row[at["diagnostic"]], row[at["variant"]], row[at["time_key"]], row[at["sample"]])
            out[key] = float(row[at[metric]])
    return out


def _headline_stats(report: dict, metrics: set[str]) -> dict[tuple, float]:
    out = {}
    for r in report["summary"]:
        if r["metric"] in metrics and r["status"] == "ok":
            for stat in ("median", "q25", "q75", "mean", "ci_low", "ci_high"):
                out[(r["field"], r["diagnostic"], r["variant"], r["time_key"], stat)] = float(r[stat])
    return out


def deviations(ref: dict[tuple, float], other: dict[tuple, float], floor: float, tol: dict[tuple, Tolerance]) -> dict:
    """Largest relative deviation where |ref| > floor, largest absolute deviation where |ref| ≤ floor (there a
    value is rounding noise), largest absolute deviation, and the largest deviation as a fraction of what
    the tolerance of its unit (``tol``, keyed by the first four parts of a key) allows."""
    assert ref.keys() == other.keys()
    dev = {k: abs(other[k] - v) for k, v in ref.items()}
    return {
        "rel": max((dev[k] / abs(v) for k, v in ref.items() if abs(v) > floor), default=0.0),
        "noise": max((dev[k] for k, v in ref.items() if abs(v) <= floor), default=0.0),
        "abs": max(dev.values(), default=0.0),
        "use": max((dev[k] / tol[k[:4]].bound(v) for k, v in ref.items()), default=0.0),
    }


def unit_tolerances(report: dict, precision: str) -> dict[tuple, Tolerance]:
    """(field, diagnostic, variant, time key) → the promised tolerance of that unit (its Jacobian strategy's)."""
    return {
        (u["field"], u["diagnostic"], u["variant"], u["time_key"]): tolerance(precision, u["meta"].get("strategy"))
        for u in report["units"]
    }


def _ratios(report: dict) -> dict[tuple, float]:
    return {
        (c["diagnostic"], c["variant"], c["time_key"]): float(c["ratio"])
        for c in report["verdict"]["checks"]
        if c["ratio"] is not None
    }


def _verdict_key(report: dict) -> tuple:
    return report["verdict"]["status"], tuple(c["status"] for c in report["verdict"]["checks"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fields", default=",".join(FIELDS), help=f"comma-separated, from {', '.join(FIELDS)}")
    p.add_argument("--precisions", default="fp64,fp32", help="comma-separated forward precisions")
    p.add_argument("--device", default="cpu", help="device of the embedded models (the analytic fields run on the CPU)")
    p.add_argument("--samples", type=int, default=6, help="samples per time point")
    p.add_argument("--points", type=int, default=32, help="nodes per loop")
    p.add_argument("--block", type=int, default=8, help="sub-Jacobian block size")
    p.add_argument("--probes", type=int, default=3, help="Hutchinson probes per sample")
    p.add_argument("--times", default="0.05,0.7", help="canonical times (OU t)")
    p.add_argument("--sampler-steps", type=int, default=20, help="steps of the sampler that draws x0 (embedded)")
    p.add_argument("--json", default=None, metavar="OUT", help="append one JSON line per row to OUT")
    args = p.parse_args()
    args.times = [float(t) for t in args.times.split(",")]
    threads_before = torch.get_num_threads()
    env = environment(args.device)
    print(f"# bench_reproducibility.py | {describe(env)}")
    print(
        f"# {args.samples} samples × {len(args.times)} time points, {args.points} nodes per loop, "
        f"sub-Jacobian block {args.block}, {args.probes} Hutchinson probes; reference: batch 64, 1 thread"
    )
    metrics = headline_metrics()
    rows: list[dict[str, Any]] = []
    worst: dict[str, dict[str, float]] = {}
    columns = [
        ("precision", "precision", ""),
        ("field", "field", ""),
        ("variation", "variation", ""),
        ("rel", "rel", ".1e"),
        ("noise", "noise", ".1e"),
        ("abs", "abs", ".1e"),
        ("use", "of bound", ".2g"),
        ("ratio", "ratio rel", ".1e"),
        ("verdict", "verdict", ""),
        ("bits", "bits", ""),
    ]
    print("| " + " | ".join(h for _, h, _ in columns) + " |")
    print("|" + "|".join("---:" for _ in columns) + "|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            floor = PRECISIONS[precision].floor_rel
            w = worst.setdefault(precision, dict.fromkeys(("rel", "noise", "abs", "use", "ratio", "x0"), 0.0))
            for field in args.fields.split(","):
                probe = probe_for(field, precision, args.device)
                x0 = clean_samples(field, probe, args.samples, args.sampler_steps)
                data = str(Path(tmp) / f"{field}-{precision}.npy")
                np.save(data, x0)
                ref = run_audit(probe, data, REFERENCE, args)
                ref_vals = {**_headline_values(ref, metrics), **_headline_stats(ref, metrics)}
                tol = unit_tolerances(ref, precision)
                for name, change in VARIATIONS.items():
                    other = run_audit(probe, data, {**REFERENCE, **change}, args)
                    dev = deviations(
                        ref_vals, {**_headline_values(other, metrics), **_headline_stats(other, metrics)}, floor, tol
                    )
                    r_ref, r_other = _ratios(ref), _ratios(other)
                    ratio = max((abs(r_other[k] - v) / v for k, v in r_ref.items() if v > 0), default=0.0)
                    row = {
                        "precision": precision,
                        "field": field,
                        "variation": name,
                        **dev,
                        "ratio": ratio,
                        "verdict": "same" if _verdict_key(ref) == _verdict_key(other) else "CHANGED",
                        "bits": "yes" if other == ref else "no",
                    }
                    rows.append(row)
                    print_row(row, columns)
                    for k in ("rel", "noise", "abs", "use", "ratio"):
                        w[k] = max(w[k], row[k])
                if field in ("funnel", "digits"):
                    torch.set_num_threads(1)
                    a = sample(probe, args.samples, 0, args.sampler_steps, Batcher(64)).double()
                    b = sample(probe, args.samples, 0, args.sampler_steps, Batcher(max(1, args.samples // 2))).double()
                    # Relative to the samples' scale: a pixel near 0 has no meaningful relative error.
                    x0_dev = float((a - b).abs().max() / a.abs().max())
                    w["x0"] = max(w["x0"], x0_dev)
                    row = {"precision": precision, "field": field, "variation": "x0 from the sampler", "rel": x0_dev}
                    rows.append(row)
                    print_row(row, columns)
    torch.set_num_threads(threads_before)
    print()
    summary = [
        {
            "precision": precision,
            **w,
            "rtol": TOLERANCE[precision].rtol,
            "atol": TOLERANCE[precision].atol,
        }
        for precision, w in worst.items()
    ]
    print_table(
        summary,
        [
            ("precision", "precision", ""),
            ("rel", "max rel", ".1e"),
            ("rtol", "rtol", ".0e"),
            ("noise", "max noise", ".1e"),
            ("abs", "max abs", ".1e"),
            ("atol", "atol", ".0e"),
            ("use", "max of bound", ".2g"),
            ("ratio", "max ratio rel", ".1e"),
            ("x0", "x0 sampler rel", ".1e"),
        ],
    )
    write_json(args.json, "reproducibility", args, env, rows + summary)


def print_row(row: dict[str, Any], columns: list[tuple[str, str, str]]) -> None:
    """One Markdown table row, printed as soon as it is measured (a full run takes a while)."""
    cells = []
    for key, _, fmt in columns:
        v = row.get(key)
        cells.append("—" if v is None else format(v, fmt) if fmt and not isinstance(v, str) else str(v))
    print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
