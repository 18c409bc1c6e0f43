"""Train the embedded ``digits`` model: a small DDPM on scikit-learn's handwritten digits at 16×16.

The data are the 1,797 8×8 digits shipped with scikit-learn (``sklearn.datasets.load_digits``, no
download), grey levels 0…16 scaled to [0, 1], upsampled bilinearly to 16×16 and mapped to [−1, 1]. The
model is a diffusers ``UNet2DModel`` (one input channel; channels 16/32/64 at 16×16/8×8/4×4; the 8×8
level is an ``AttnDownBlock2D``/``AttnUpBlock2D`` pair, and the 4×4 middle block has attention too;
GroupNorm with 8 groups) trained with DDPM's ε-prediction loss ‖ε̂(x_k, k) − ε‖² under DDPMScheduler's
linear β schedule 1e-4 → 0.02, T = 1000 (Ho et al. 2020). The weights saved are an exponential moving
average of the trained ones. The result is a ``DDPMPipeline`` folder (safetensors), loadable by
``conservcheck.adapters.diffusers_unet``; the package ships it as ``conservcheck/assets/digits-ddpm``.
Needs scikit-learn (``pip install -e ".[train]"``). Writes to ``out/digits-ddpm`` in the repository
(git-ignored) unless ``--out`` says otherwise; it refuses to write over the shipped model unless
``--replace-shipped`` is given.

Deterministic on CPU for a given seed, thread count and torch version (the default run uses one thread).
A sample grid from the trained model (1,000 ancestral DDPM steps) is written to ``--samples`` (a
temporary folder by default).

Conservativity while training: with ``--metric-every N`` the EMA network is measured every N steps with
:class:`conservcheck.metrics.ConservativityMetric` (rotation loops, the scale-free |∮ s·dy| / ∮|s||dy|) on a
fixed set of digits, so every evaluation uses the very same loops and successive values show how the
network changed. With ``--tensorboard DIR`` the loss and the metric (per time point and over all) are
logged to TensorBoard (``tensorboard --logdir DIR``), and ``--curve PNG`` reads the logged metric back from
the event file and draws it. The metric draws from its own keyed random streams, so turning it on does not
change the training run (the ``train`` extra has what it needs).

    python examples/train_digits.py                       # the shipped model's recipe, into out/digits-ddpm
    python examples/train_digits.py --steps 20 --eval-draws 1 --samples ''   # seconds
    python examples/train_digits.py --steps 600 --metric-every 50 --tensorboard out/runs/digits \
        --curve out/conservativity.png --out out/digits-tracked
    python examples/train_digits.py --out conservcheck/assets/digits-ddpm --replace-shipped   # regenerate it
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import platform
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from _extras import OUT, output_folder, require

DEFAULT_OUT = OUT / "digits-ddpm"

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(16, 32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=8,
)
#: The units of the network's output, for ConservativityMetric (ε-prediction, DDPM's linear 1000-step β).
DECLARATION = dict(parameterization="epsilon", process="ou", time_convention="linear", sample_shape=(1, 16, 16))
#: Arguments that only observe the run (they change no weight), left out of training.json.
TRACKING = ("metric_every", "metric_samples", "metric_points", "metric_times", "tensorboard", "curve")
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    prediction_type="epsilon",
    clip_sample=True,
    variance_type="fixed_small",
)


def digits_16() -> torch.Tensor:
    """The scikit-learn digits as float32 images [1797, 1, 16, 16] in [−1, 1]."""
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
    up = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    return (2.0 * up - 1.0).clamp(-1.0, 1.0)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(args: argparse.Namespace) -> dict:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    data = digits_16()
    unet = UNet2DModel(**UNET_CONFIG)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    sqrt_ab = scheduler.alphas_cumprod.sqrt()
    sqrt_1m_ab = (1 - scheduler.alphas_cumprod).sqrt()
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(data), generator=gen)
    cursor, losses, log = 0, [], []
    tracker = Tracker(args, data) if args.metric_every or args.tensorboard else None
    start = time.perf_counter()
    for step in range(args.steps):
        if cursor + args.batch_size > len(data):
            order, cursor = torch.randperm(len(data), generator=gen), 0
        x0 = data[order[cursor : cursor + args.batch_size]]
        cursor += args.batch_size
        k = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        xk = sqrt_ab[k].view(-1, 1, 1, 1) * x0 + sqrt_1m_ab[k].view(-1, 1, 1, 1) * eps
        loss = F.mse_loss(unet(xk, k).sample, eps)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if tracker is not None:
            tracker.step(step + 1, loss.item(), ema)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            mean = float(np.mean(losses[-args.log_every :]))
            log.append({"step": step + 1, "loss": mean, "seconds": round(time.perf_counter() - start, 1)})
            print(f"step {step + 1:5d}  loss {mean:.4f}  {time.perf_counter() - start:7.1f} s", flush=True)
    train_seconds = time.perf_counter() - start
    if tracker is not None:
        tracker.close()
    final_loss = evaluate_loss(ema, data, sqrt_ab, sqrt_1m_ab, args.seed, args.eval_draws)
    print(f"EMA model: ε-loss on all digits, {args.eval_draws} noise draws each: {final_loss:.4f}", flush=True)

    out = pathlib.Path(args.out)
    pipe = DDPMPipeline(unet=ema, scheduler=scheduler)
    pipe.save_pretrained(str(out), safe_serialization=True)
    record = {
        "script": "examples/train_digits.py",
        "arguments": {k: v for k, v in vars(args).items() if k not in ("out", "samples", "replace_shipped", *TRACKING)},
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
        "parameters": sum(p.numel() for p in ema.parameters()),
        "scheduler": SCHEDULER_CONFIG,
        "data": "sklearn load_digits, 1797 images, /16, bilinear 8x8 -> 16x16, mapped to [-1, 1]",
        "train_loss_log": log,
        "final_train_loss": log[-1]["loss"],
        "ema_eval_loss": final_loss,
        "train_seconds": round(train_seconds, 1),
        **({"conservativity_log": tracker.log} if tracker is not None and tracker.log else {}),
        "versions": {
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "python": platform.python_version(),
        },
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"model saved to {out}", flush=True)
    if args.samples:
        write_samples(pipe, pathlib.Path(args.samples), args.seed)
    return record


class Tracker:
    """The loss and ConservativityMetric of the EMA network every ``--metric-every`` steps, to TensorBoard."""

    def __init__(self, args: argparse.Namespace, data: torch.Tensor) -> None:
        self.every = args.metric_every
        self.log: list[dict] = []
        self.writer = None
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(args.tensorboard)
        if self.every:
            from conservcheck.metrics import ConservativityMetric

            times = [int(k) for k in args.metric_times.split(",")]
            self.metric = ConservativityMetric(
                paths="rotation",
                time_points=times,
                seed=args.seed,
                n_points=args.metric_points,
                declaration=DECLARATION,
            )
            # The first digits, always the same: every evaluation measures the same loops.
            self.x0 = data[: args.metric_samples]

    def step(self, step: int, loss: float, model: torch.nn.Module) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
        if not self.every or step % self.every:
            return
        self.metric.reset()
        self.metric.update(model, self.x0)
        values = {k: float(v) for k, v in self.metric.compute().items()}
        self.log.append({"step": step, **values})
        headline = "loop.rotation.abs_circulation_ratio"
        print(f"step {step:5d}  {headline} {values[headline]:.3g}", flush=True)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"conservativity/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def logged_scalars(logdir: str | pathlib.Path, prefix: str = "conservativity/") -> dict[str, list[tuple[int, float]]]:
    """Every scalar under ``prefix`` in a TensorBoard log folder, read back from its event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag[len(prefix) :]: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag.startswith(prefix)
    }


def plot_curve(logdir: str | pathlib.Path, path: pathlib.Path) -> None:
    """The logged |∮ s·dy| / ∮|s||dy| against the training step, one line per time point (read back from the
    event file), as a PNG."""
    from matplotlib.figure import Figure

    series = logged_scalars(logdir)
    headline = "loop.rotation.abs_circulation_ratio"
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for tag, points in sorted(series.items(), key=lambda kv: (kv[0] != headline, kv[0])):
        if not tag.startswith(headline):
            continue
        steps, values = zip(*points)
        label = "all time points" if tag == headline else tag.split("/", 1)[1]
        ax.plot(steps, values, marker="o", ms=3, lw=2.2 if tag == headline else 1, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("median |∮ s·dy| / ∮|s||dy|  (rotation loops)")
    ax.set_title("digits DDPM (EMA): conservativity during training, from TensorBoard", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, metadata={"Software": None})
    print(f"curve written to {path}", flush=True)


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    data: torch.Tensor,
    sqrt_ab: torch.Tensor,
    sqrt_1m_ab: torch.Tensor,
    seed: int,
    draws: int = 8,
) -> float:
    """Mean ε-prediction MSE over all images × ``draws`` (k, ε) pairs, k uniform on 0…T−1."""
    gen = torch.Generator().manual_seed(seed + 1)
    total = 0.0
    for _ in range(draws):
        k = torch.randint(0, len(sqrt_ab), (len(data),), generator=gen)
        eps = torch.randn(data.shape, generator=gen)
        xk = sqrt_ab[k].view(-1, 1, 1, 1) * data + sqrt_1m_ab[k].view(-1, 1, 1, 1) * eps
        for i in range(0, len(data), 256):
            total += F.mse_loss(model(xk[i : i + 256], k[i : i + 256]).sample, eps[i : i + 256], reduction="sum").item()
    return total / (draws * data.numel())


def save_grid(images: np.ndarray, path: pathlib.Path) -> None:
    """64 grey images [64, 16, 16] in [0, 1] as an 8×8 grid PNG, upscaled ×4."""
    from PIL import Image

    # one dark-grey pixel between tiles: the digits fill their frames and would otherwise touch
    tiles = np.pad(images, ((0, 0), (1, 0), (1, 0)), constant_values=0.25).reshape(8, 8, 17, 17)
    grid = np.pad(tiles.transpose(0, 2, 1, 3).reshape(136, 136), ((0, 1), (0, 1)), constant_values=0.25)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid * 255).round().astype(np.uint8)).resize((548, 548), Image.NEAREST).save(path)


def write_samples(pipe, path: pathlib.Path, seed: int) -> None:
    """An 8×8 grid of ancestral DDPM samples (1,000 steps) as a PNG."""
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=64, generator=torch.Generator().manual_seed(seed), output_type="np").images[..., 0]
    save_grid(images, path)
    print(f"samples written to {path}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="pipeline folder to write")
    parser.add_argument(
        "--replace-shipped", action="store_true", help="allow --out to be the model shipped in conservcheck/assets"
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--eval-draws", type=int, default=8, help="(k, ε) draws per digit for the final ε-loss")
    parser.add_argument(
        "--samples",
        default=str(pathlib.Path(tempfile.gettempdir()) / "conservcheck-digits.png"),
        help="PNG of 64 samples ('' for none)",
    )
    parser.add_argument("--metric-every", type=int, default=0, help="measure conservativity every N steps (0: off)")
    parser.add_argument("--metric-samples", type=int, default=16, help="digits the metric measures (the first N)")
    parser.add_argument("--metric-points", type=int, default=64, help="nodes per rotation loop")
    parser.add_argument("--metric-times", default="10,100,250,500,750,990", help="time indices k, comma-separated")
    parser.add_argument("--tensorboard", default=None, help="TensorBoard log folder for the loss and the metric")
    parser.add_argument("--curve", default=None, help="PNG of the logged metric, read back from --tensorboard")
    args = parser.parse_args()
    if args.curve and not (args.tensorboard and args.metric_every):
        parser.error("--curve draws what --tensorboard logged: pass --tensorboard DIR and --metric-every N")
    tracking = ["torchmetrics"] * bool(args.metric_every) + ["tensorboard"] * bool(args.tensorboard)
    require("examples/train_digits.py", "train", "sklearn", *tracking, *["matplotlib"] * bool(args.curve))
    args.out = str(output_folder(args.out, args.replace_shipped))
    train(args)
    if args.curve:
        plot_curve(args.tensorboard, pathlib.Path(args.curve))


if __name__ == "__main__":
    main()
