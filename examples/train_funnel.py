"""Train the embedded ``funnel`` model: an MLP ε-predictor for Neal's funnel under the paper's OU process.

Data: Neal's funnel in D = 10 dimensions, v ~ N(0, 3²), x_i | v ~ N(0, e^v) for i = 1…9, drawn fresh
every step (``conservcheck.analytic.funnel.Funnel.sample``). Noising: y = α x0 + σ ε with α = e^{−t},
σ = √(1 − e^{−2t}) (Eq. 1). Training times: log σ̃ uniform on [log 0.02, log 40], σ̃ = σ/α = √(e^{2t} − 1),
i.e. t from 2·10⁻⁴ to 3.7 — the range the audit probes. Loss: denoising score matching in ε form with
EDM's weighting, Σ_i (1 + σ̃²/σ_d,i²)(ε̂_i − ε_i)² (see :mod:`conservcheck.networks.funnel_mlp`).

The model (``conservcheck.networks.funnel_mlp.FunnelNet``) is saved as ``model.safetensors`` plus
``config.json`` (architecture, process, parameterization, funnel parameters, training record) in
``out/funnel-mlp`` in the repository (git-ignored) unless ``--out`` says otherwise; the package ships the
result as ``conservcheck/assets/funnel-mlp`` and the script refuses to write over it unless
``--replace-shipped`` is given. No extra needed. Deterministic on CPU for a given seed, thread count and torch version.
At the end the script reports the per-sample relative error ‖s_θ − s‖/‖s‖ of the model's score against
the exact funnel score at a few times (median, 90th percentile).

    python examples/train_funnel.py                       # the shipped model's recipe, into out/funnel-mlp
    python examples/train_funnel.py --steps 20 --log-every 10                          # seconds
    python examples/train_funnel.py --out conservcheck/assets/funnel-mlp --replace-shipped   # regenerate it
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import platform
import time

import torch
from _extras import OUT, output_folder

from conservcheck.analytic.funnel import Funnel
from conservcheck.networks.funnel_mlp import FunnelNet, FunnelNetConfig

DEFAULT_OUT = OUT / "funnel-mlp"
SIGMA_VE_RANGE = (0.02, 40.0)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def t_from_sigma_ve(sigma_ve: torch.Tensor) -> torch.Tensor:
    """OU time with σ/α = σ̃: t = ½ log(1 + σ̃²)."""
    return 0.5 * torch.log1p(sigma_ve**2)


def relative_errors(
    model: FunnelNet, funnel: Funnel, times: list[float], n: int, seed: int
) -> dict[str, dict[str, float]]:
    """Per-sample relative score error ‖s_θ − s‖/‖s‖ over n samples of p_t at each t (float64, exact score).

    Reports the median and 90th percentile, and √(E‖s_θ − s‖²/E‖s‖²), which the funnel's heavy tail
    (samples with v ≳ 9, where x_i ~ e^{v/2} reaches hundreds) dominates.
    """
    gen = torch.Generator().manual_seed(seed)
    model64 = copy.deepcopy(model).double()
    out = {}
    for t in times:
        x0 = funnel.sample(n, gen)
        tt = torch.full((n,), t, dtype=torch.float64)
        sigma = math.sqrt(-math.expm1(-2 * t))
        y = math.exp(-t) * x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            s_model = -model64(y, tt) / sigma
        s_exact = funnel.score(y, tt)
        err2, ref2 = (s_model - s_exact).square().sum(1), s_exact.square().sum(1)
        rel = (err2 / ref2).sqrt()
        out[f"{t:g}"] = {
            "median": round(float(rel.median()), 4),
            "q90": round(float(rel.quantile(0.9)), 4),
            "rms_ratio": round(float((err2.mean() / ref2.mean()).sqrt()), 4),
        }
    return out


def train(args: argparse.Namespace) -> dict:
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    funnel = Funnel(n=9, scale=3.0)
    config = FunnelNetConfig(hidden=args.hidden, blocks=args.blocks)
    model = FunnelNet(config)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sd = torch.tensor(config.sigma_data)
    gen = torch.Generator().manual_seed(args.seed)
    lo, hi = math.log(SIGMA_VE_RANGE[0]), math.log(SIGMA_VE_RANGE[1])
    log, running = [], []
    start = time.perf_counter()
    for step in range(args.steps):
        x0 = funnel.sample(args.batch_size, gen).float()
        sigma_ve = torch.exp(lo + (hi - lo) * torch.rand(args.batch_size, generator=gen))
        t = t_from_sigma_ve(sigma_ve)
        eps = torch.randn(x0.shape, generator=gen)
        y = torch.exp(-t)[:, None] * x0 + torch.sqrt(-torch.expm1(-2 * t))[:, None] * eps
        weight = 1 + sigma_ve[:, None] ** 2 / sd**2
        loss = (weight * (model(y, t) - eps) ** 2).sum(1).mean()
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - decay)
        running.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            mean = sum(running) / len(running)
            running = []
            log.append({"step": step + 1, "loss": mean, "seconds": round(time.perf_counter() - start, 1)})
            print(f"step {step + 1:6d}  weighted ε-loss {mean:.4f}  {time.perf_counter() - start:7.1f} s", flush=True)
    train_seconds = time.perf_counter() - start
    errors = relative_errors(ema, funnel, [0.01, 0.05, 0.2, 0.5, 1.0, 2.0], 4096, args.seed + 1)
    for t, e in errors.items():
        print(
            f"t = {t:>4}: relative score error median {e['median']:.4f}, q90 {e['q90']:.4f}, "
            f"rms ratio {e['rms_ratio']:.4f}",
            flush=True,
        )

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in ema.state_dict().items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    record = {
        "model": "FunnelNet",
        "architecture": config.to_dict(),
        "process": "ou",
        "time": "canonical OU time t (alpha = exp(-t), sigma = sqrt(1 - exp(-2t)))",
        "parameterization": "epsilon",
        "data": {"distribution": "neal_funnel", "n": funnel.n, "scale": funnel.scale},
        "training": {
            "script": "examples/train_funnel.py",
            "arguments": {k: v for k, v in vars(args).items() if k not in ("out", "replace_shipped")},
            "sigma_ve_range": list(SIGMA_VE_RANGE),
            "parameters": sum(p.numel() for p in ema.parameters()),
            "loss_log": log,
            "final_train_loss": log[-1]["loss"],
            "relative_score_error": errors,
            "train_seconds": round(train_seconds, 1),
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
        },
    }
    (out / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"model saved to {out}", flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder to write")
    parser.add_argument(
        "--replace-shipped", action="store_true", help="allow --out to be the model shipped in conservcheck/assets"
    )
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    parser.add_argument("--log-every", type=int, default=500)
    args = parser.parse_args()
    args.out = str(output_folder(args.out, args.replace_shipped))
    train(args)


if __name__ == "__main__":
    main()
