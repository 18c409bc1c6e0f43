"""Reproduce the paper's figure types with the public API, on the embedded models (reduced CPU form).

* Fig. 2 / 6 — loop integrals |∮ s·dy| (and the Eq. 7 ratio) over rotation, Brownian-bridge and
  projection loops, and the curl |∂ᵢsⱼ − ∂ⱼsᵢ| of a random 64×64 sub-Jacobian, against the time index k:
  the embedded ``digits`` DDPM (16×16 digits standing in for the paper's MNIST model), x0 = the training
  digits (scikit-learn) or, without scikit-learn, the model's own samples.
* Figs. 5 / 7 — the same loop integrals as box plots per loop type and time index.
* Fig. 3 / 12 (funnel panels) and Fig. 4 — the embedded ``funnel`` MLP, x0 = exact funnel samples: loops,
  curl (the whole 10×10 Jacobian), and the Stein diagnostic against the funnel's exact score: the error
  norm ‖s_ref − s_θ‖ and the Stein value ∇·e + s_refᵀe (Eq. 20–21) against t.

Every audit is saved as a JSON report; figures come from :func:`conservcheck.plots.plot_report` (what
``conservcheck plot report.json --out DIR`` runs) and the headline numbers go to ``numbers.md``.

    python examples/reproduce_figures.py                               # ~minutes on a CPU
    python examples/reproduce_figures.py --full                         # the paper's protocol (GPU)
    python examples/reproduce_figures.py --full --model google/ddpm-cifar10-32 --device cuda

Reduced form: 16 samples per time point, 128 nodes per loop, 6 time indices. ``--full``: 256 samples,
1000 nodes, k = 0, 50, …, 950, 999 (the paper's protocol, §3.2–3.3).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np
import torch

from conservcheck.adapters import embedded
from conservcheck.audit import audit
from conservcheck.plots import plot_report
from conservcheck.report import AuditReport

#: Stein reference for the funnel model: its exact score (``funnel`` in conservcheck.reference: n = D − 1, scale 3).
FUNNEL_REFERENCE = "funnel"
#: Metrics listed in numbers.md: (diagnostic, metric, label).
HEADLINE = (
    ("loop", "abs_circulation", "|∮ s·dy|"),
    ("loop", "abs_eq7", "Eq. 7: 2|∮ s·dy| / ∮|y||dy|"),
    ("curl", "curl_mean_abs", "mean |∂ᵢsⱼ − ∂ⱼsᵢ|"),
    ("stein", "err_norm", "‖s_ref − s_θ‖"),
    ("stein", "stein", "∇·e + s_refᵀe"),
)


def digits_data(folder: pathlib.Path) -> str | None:
    """The training digits as a float array [N, 1, 16, 16] in [−1, 1] (.npy), or None without scikit-learn."""
    try:
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
        from train_digits import digits_16
    except ImportError:
        return None
    try:
        x = digits_16().numpy()
    except ImportError:
        return None
    path = folder / "digits16.npy"
    np.save(path, x)
    return str(path)


def funnel_data(folder: pathlib.Path, n: int, seed: int) -> str:
    """n exact samples of the embedded funnel's clean distribution [n, 10] (.npy)."""
    funnel = embedded.reference_field("funnel")
    x = funnel.sample(n, torch.Generator().manual_seed(seed)).numpy()
    path = folder / "funnel.npy"
    np.save(path, x)
    return str(path)


def numbers_table(report: AuditReport, title: str) -> str:
    """Markdown: median of each headline metric per loop type / variant and time point, control in brackets."""
    s = report.summary(field=None)
    s = s[s["status"] == "ok"]
    lines = [f"## {title}", "", f"model `{report.header['model'].get('reference')}`, verdict: **{report.verdict}**", ""]
    for diagnostic, metric, label in HEADLINE:
        sub = s[(s["diagnostic"] == diagnostic) & (s["metric"] == metric)]
        if sub.empty:
            continue
        keys = list(dict.fromkeys(sub.sort_values("t")["time_key"]))
        lines += [f"**{label}** — median over samples (conservative control's median in brackets)", "",
                  "| variant | " + " | ".join(report.time_label(k) for k in keys) + " |",
                  "|---" * (len(keys) + 1) + "|"]
        for variant in dict.fromkeys(sub["variant"]):
            cells = []
            for key in keys:
                model = sub[(sub["variant"] == variant) & (sub["time_key"] == key) & (sub["field"] == "model")]
                ctrl = sub[(sub["variant"] == variant) & (sub["time_key"] == key) & (sub["field"] == "control")]
                cell = f"{float(model['median'].iloc[0]):.3g}" if len(model) else "–"
                cells.append(cell + (f" ({float(ctrl['median'].iloc[0]):.2g})" if len(ctrl) else ""))
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def run(model: str, out: pathlib.Path, name: str, **options) -> AuditReport:
    """Audit ``model``, save ``<name>.json`` and its figures under ``out/<name>/``."""
    print(f"auditing {model} ({name}) …", flush=True)
    report = audit(model, **options)
    report.to_json(out / f"{name}.json")
    figures = plot_report(report, out / name)
    print(f"  verdict: {report.verdict}\n  {len(figures)} figures in {out / name}", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="figures-paper", help="output folder")
    parser.add_argument("--full", action="store_true",
                        help="the paper's protocol: 256 samples, 1000 nodes, 21 time indices")
    parser.add_argument("--model", default="embedded:digits",
                        help="image model for Figs. 2/5/7 (e.g. google/ddpm-cifar10-32)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="conservcheck-figures-"))

    if args.full:
        common = dict(n_samples=256, n_points=1000, seed=args.seed, device=args.device)
        indices = "0:950:50,999"
    else:
        common = dict(n_samples=16, n_points=128, seed=args.seed, device=args.device)
        indices = "10,100,250,500,750,990"
    image_opts = dict(common, paths="rotation,brownian,projection", curl="subjacobian", time_indices=indices)
    if args.model == "embedded:digits":
        data = digits_data(scratch)
        if data is not None:
            image_opts["data"] = data
    sections = [numbers_table(run(args.model, out, "image", **image_opts), f"Figs. 2, 5, 7 — {args.model}")]

    funnel_opts = dict(common, paths="rotation,brownian,projection", curl="subjacobian", stein=FUNNEL_REFERENCE,
                       data=funnel_data(scratch, 4096, args.seed))
    if not args.full:
        funnel_opts["n_samples"] = 64
    sections.append(numbers_table(run("embedded:funnel", out, "funnel", **funnel_opts),
                                  "Figs. 3, 4, 12 — embedded:funnel against its exact score"))

    mode = "full (the paper's protocol)" if args.full else "reduced CPU form"
    header = [f"# Paper figure types — {mode}", "",
              f"Command: `python examples/reproduce_figures.py {' '.join(sys.argv[1:])}`".rstrip(), "",
              "Figures: `image/` and `funnel/` (redraw with `conservcheck plot image.json --out image`).", ""]
    (out / "numbers.md").write_text("\n".join(header + sections) + "\n", encoding="utf-8")
    print(f"numbers written to {out / 'numbers.md'}", flush=True)


if __name__ == "__main__":
    main()
