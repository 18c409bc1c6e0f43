"""Latent diffusion on the digits, trained here, then audited in latent space (the paper's Fig. 2 b, d).

1. A small ``AutoencoderKL`` (one channel, 16×16 images → 2×8×8 latents, 16/32 channels) is trained on
   scikit-learn's digits (the same 16×16 images as the embedded ``digits`` model) with the loss
   ‖D(z) − x‖² + β KL(q(z|x) ‖ N(0, I)), z ~ q(z|x). Its ``scaling_factor`` is set to 1 / std of the
   latent means over the data, so the diffusion model sees unit-variance latents.
2. A small ``UNet2DModel`` (2×8×8, 32/64 channels, an ``AttnDownBlock2D``) learns ε under DDPMScheduler's
   linear β schedule (T = 1000) on the scaled latents z = scaling_factor · mean(q(z|x)).
3. Both are saved as a diffusers pipeline folder (``vae/``, ``unet/``, ``scheduler/``,
   ``model_index.json``) — the layout conservcheck's ``latent`` adapter reads — with a PNG of decoded
   samples and the training latents (``latents.npy``), and the folder is audited in latent space
   (the paper's Fig. 2 b, d and Fig. 4, which is computed on a latent diffusion model): loop integrals
   over rotation, Brownian-bridge and projection loops, the 64×64 sub-Jacobian curl, and the Stein
   diagnostic against ``data:latents.npy`` — the exact score of the noised empirical distribution of
   the training latents, the field the UNet was trained to match — at six time indices (reduced CPU
   form), x0 drawn from the latent model itself. The report, its figures (``figures/``) and the medians
   (``numbers.md``) go into the folder.

    python examples/latent_diffusion.py                  # into out/latent-digits; 10–15 minutes on a 2-core CPU
    python examples/latent_diffusion.py --quick          # a smoke run into out/latent-digits-quick, under a minute
    conservcheck audit out/latent-digits --paths rotation   # audit the folder again later

Needs scikit-learn and matplotlib (``pip install -e ".[examples]"``). Writes under ``out/`` in the
repository (git-ignored) unless ``--out`` says otherwise. Seeded and deterministic on CPU for a given
thread count and torch version.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _extras import OUT, output_folder, require  # noqa: E402
from reproduce_figures import numbers_table  # noqa: E402
from train_digits import digits_16, save_grid  # noqa: E402  (the same data as the embedded digits model)

VAE_CONFIG = dict(
    in_channels=1,
    out_channels=1,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=2,
    norm_num_groups=8,
    sample_size=16,
)
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=2,
    out_channels=2,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    prediction_type="epsilon",
    clip_sample=False,
)


def cosine_lr(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def batches(n: int, size: int, steps: int, gen: torch.Generator):
    """Indices of ``steps`` minibatches: epochs of seeded permutations."""
    order, cursor = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if cursor + size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        yield order[cursor : cursor + size]
        cursor += size


def train_vae(data: torch.Tensor, args: argparse.Namespace):
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step, idx in enumerate(batches(len(data), args.batch_size, args.vae_steps, gen)):
        x = data[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec, kl = F.mse_loss(recon, x), post.kl().mean() / x[0].numel()
        loss = rec + args.kl_weight * kl
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.vae_steps, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 250 == 0:
            print(
                f"vae  step {step + 1:5d}  recon {rec.item():.4f}  kl/pixel {kl.item():.3f}  "
                f"{time.perf_counter() - start:6.1f} s",
                flush=True,
            )
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        mean = vae.encode(data).latent_dist.mean
        recon_err = F.mse_loss(vae.decode(mean).sample, data).item()
    scaling = 1.0 / float(mean.std())
    vae.register_to_config(scaling_factor=scaling)
    return (
        vae,
        mean * scaling,
        {"recon_mse": recon_err, "scaling_factor": scaling, "seconds": round(time.perf_counter() - start, 1)},
    )


def train_unet(latents: torch.Tensor, args: argparse.Namespace):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(args.seed + 1)
    unet = UNet2DModel(**UNET_CONFIG)
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr)
    ab = sched.alphas_cumprod
    gen = torch.Generator().manual_seed(args.seed + 1)
    start, recent, log = time.perf_counter(), [], []
    for step, idx in enumerate(batches(len(latents), args.batch_size, args.unet_steps, gen)):
        z0 = latents[idx]
        k = torch.randint(0, len(ab), (len(z0),), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        zk = ab[k].sqrt().view(-1, 1, 1, 1) * z0 + (1 - ab[k]).sqrt().view(-1, 1, 1, 1) * eps
        loss = F.mse_loss(unet(zk, k).sample, eps)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.unet_steps, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        recent.append(loss.item())
        if (step + 1) % 250 == 0 or step + 1 == args.unet_steps:
            seconds = round(time.perf_counter() - start, 1)
            log.append({"step": step + 1, "loss": float(np.mean(recent)), "seconds": seconds})
            print(f"unet step {step + 1:5d}  ε-loss {log[-1]['loss']:.4f}  {log[-1]['seconds']:6.1f} s", flush=True)
            recent = []
    unet.eval().requires_grad_(False)
    return unet, sched, {"loss_log": log, "final_loss": log[-1]["loss"], "seconds": log[-1]["seconds"]}


@torch.no_grad()
def sample_png(vae, unet, sched, path: pathlib.Path, seed: int, steps: int) -> None:
    """64 ancestral DDPM samples in latent space (``steps`` of the 1,000), decoded, as an 8×8 grid PNG."""
    gen = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    z = torch.randn(64, unet.config.in_channels, size, size, generator=gen)
    sched.set_timesteps(steps)
    for k in sched.timesteps:
        z = sched.step(unet(z, k).sample, k, z, generator=gen).prev_sample
    images = (vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1) + 1) / 2
    save_grid(images[:, 0].numpy(), path)


def save_pipeline(folder: pathlib.Path, vae, unet, sched, record: dict) -> None:
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    sched.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "DiffusionPipeline",
        "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        default=None,
        help="pipeline folder to write, report and figures inside (default: out/latent-digits, with --quick "
        "out/latent-digits-quick)",
    )
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--unet-steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-3, help="β: weight of the per-pixel KL term")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=16, help="audit samples per time point")
    parser.add_argument("--points", type=int, default=128, help="nodes per loop")
    parser.add_argument("--time-indices", default="10,100,250,500,750,990")
    parser.add_argument("--sample-steps", type=int, default=1000, help="DDPM steps for the sample PNG")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 40 training steps each, 4 audit samples, 32 nodes, 2 time indices",
    )
    parser.add_argument("--skip-audit", action="store_true")
    args = parser.parse_args()
    require("examples/latent_diffusion.py", "examples", "sklearn", "matplotlib")
    args.out = str(output_folder(args.out or OUT / ("latent-digits-quick" if args.quick else "latent-digits")))
    if args.quick:
        args.vae_steps, args.unet_steps, args.sample_steps = 40, 40, 20
        args.samples, args.points, args.time_indices = 4, 32, "10,500"
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out = pathlib.Path(args.out)

    data = digits_16()
    vae, latents, vae_log = train_vae(data, args)
    print(f"autoencoder: reconstruction MSE {vae_log['recon_mse']:.4f}, scaling_factor {vae_log['scaling_factor']:.4f}")
    unet, sched, unet_log = train_unet(latents, args)
    save_pipeline(
        out,
        vae,
        unet,
        sched,
        {"script": "examples/latent_diffusion.py", "arguments": vars(args), "autoencoder": vae_log, "unet": unet_log},
    )
    np.save(out / "latents.npy", latents.numpy())
    sample_png(vae, unet, sched, out / "samples.png", args.seed, args.sample_steps)
    print(f"pipeline saved to {out}; decoded samples in {out / 'samples.png'}", flush=True)
    if args.skip_audit:
        return

    from conservcheck import audit
    from conservcheck.report.plots import plot_report

    report = audit(
        str(out),
        paths="rotation,brownian,projection",
        curl="subjacobian",
        data=str(out / "latents.npy"),
        stein=f"data:{out / 'latents.npy'}",
        time_indices=args.time_indices,
        n_samples=args.samples,
        n_points=args.points,
        seed=args.seed,
    )
    report.to_json(out / "audit.json")
    plot_report(report, out / "figures")
    header = [
        "# Latent diffusion on the digits — audited in latent space",
        "",
        f"Command: `python examples/latent_diffusion.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Autoencoder reconstruction MSE {vae_log['recon_mse']:.4f} (images in [−1, 1]), scaling factor "
        f"{vae_log['scaling_factor']:.4f}; UNet final ε-loss {unet_log['final_loss']:.4f}. x0: the encoded "
        "training latents (as the paper's forward samples of the data); Stein reference: the exact "
        "score of the noised training latents.",
        "",
    ]
    (out / "numbers.md").write_text(
        "\n".join(header) + "\n" + numbers_table(report, "Figs. 2 b, d and 4 — latent space") + "\n", encoding="utf-8"
    )
    print(
        f"verdict: {report.verdict}\nreport {out / 'audit.json'}, figures {out / 'figures'}, "
        f"numbers {out / 'numbers.md'}"
    )


if __name__ == "__main__":
    main()
