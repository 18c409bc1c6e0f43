"""Reproduce the paper's figure types with the public API, on the embedded models or on hub models.

* Fig. 2 / 6 / 8 / 10 — loop integrals |∮ s·dy| (with the per-length and Eq. 7 normalisations) over
  rotation, Brownian-bridge and projection loops, and the curl |∂ᵢsⱼ − ∂ⱼsᵢ| of a random 64×64
  sub-Jacobian, against the time index k, for each image model (``--model``, repeatable): by default the
  embedded ``digits`` DDPM (16×16 digits standing in for the paper's MNIST model, x0 = the training
  digits from scikit-learn); on a GPU with the Hub,
  ``google/ddpm-cifar10-32`` (Figs. 8–11) and ``google/ncsnpp-celebahq-256`` (Fig. 3 b, d and Fig. 12;
  a VE model, so against σ at the tool's default noise levels).
* Figs. 5 / 7 / 9 / 11 — the same loop integrals as box plots per loop type and time point.
* Fig. 3 / 12 (funnel panels) and Fig. 4 — the embedded ``funnel`` MLP, x0 = exact funnel samples: loops,
  curl, and the Stein diagnostic against the funnel's exact score: the error norm ‖s_ref − s_θ‖ and the
  Stein value ∇·e + s_refᵀe (Eq. 20–21) against t.

Each audit is saved as ``<name>.json``; its figures come from :func:`conservcheck.report.plots.plot_report`
(what ``conservcheck plot <name>.json --out <name>`` runs) and the medians go to ``numbers.md``, where a
cell the audit could not resolve (its floor set by too few nodes, not by rounding) is marked.
Everything goes under ``out/figures-paper`` (``out/figures-paper-quick`` with ``--quick``) in the
repository, git-ignored, unless ``--out`` says otherwise. Needs matplotlib and scikit-learn
(``pip install -e ".[examples]"``).

    python examples/reproduce_figures.py --quick                      # a smoke run, ~1 minute on a CPU
    python examples/reproduce_figures.py                              # reduced CPU form, minutes
    python examples/reproduce_figures.py --full --device cuda \\
        --model google/ddpm-cifar10-32 --model google/ncsnpp-celebahq-256

Forms: ``--quick`` 4 samples per time point, 32 nodes per loop, 2 time points (too few nodes to resolve
most loops: ``numbers.md`` marks those cells); the default (reduced) 16 samples, each loop type's default
nodes, 6 time indices; ``--full`` the paper's protocol (§3.2–3.3): 256 samples, 1000
nodes, k = 0, 50, …, 950, 999 on discrete schedules.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np
import torch
from _extras import OUT, output_folder, require

from conservcheck import DiscreteSchedule, audit
from conservcheck.adapters.resolve import load_reference
from conservcheck.analytic.reference_scores import resolve_reference
from conservcheck.report.audit_report import AuditReport
from conservcheck.report.plots import plot_report

#: Stein reference for the funnel model: its exact score (Neal's funnel, n = D − 1, scale 3).
FUNNEL_REFERENCE = "funnel"
#: Metrics listed in numbers.md: (diagnostic, metric, label).
HEADLINE = (
    ("loop", "abs_circulation", "|∮ s·dy|"),
    ("loop", "abs_circulation_per_length", "|∮ s·dy| / ∮|dy|"),
    ("loop", "abs_eq7", "Eq. 7: 2|∮ s·dy| / ∮|y||dy|"),
    ("curl", "curl_mean_abs", "mean |∂ᵢsⱼ − ∂ⱼsᵢ|"),
    ("stein", "err_norm", "‖s_ref − s_θ‖"),
    ("stein", "stein", "∇·e + s_refᵀe"),
)
#: (samples per time point, nodes per loop, time indices on a 1000-step schedule, canonical times) per form;
#: None nodes: each loop type's own default (conservcheck.geometry.loops.LoopType.cpu_points on a CPU).
FORMS = {
    "quick": (4, 32, "10,500", "0.05,1.0"),
    "reduced": (16, None, "10,100,250,500,750,990", None),
    "full": (256, 1000, "0:950:50,999", None),
}


def digits_data(folder: pathlib.Path) -> str:
    """The training digits as a float array [N, 1, 16, 16] in [−1, 1] (.npy)."""
    from train_digits import digits_16

    path = folder / "digits16.npy"
    np.save(path, digits_16().numpy())
    return str(path)


def funnel_data(folder: pathlib.Path, probe, n: int, seed: int) -> str:
    """n exact samples [n, 10] of the funnel the embedded model was trained on (the Stein reference's law)."""
    x = resolve_reference(FUNNEL_REFERENCE, probe).sample(n, torch.Generator().manual_seed(seed)).numpy()
    path = folder / "funnel.npy"
    np.save(path, x)
    return str(path)


def numbers_table(report: AuditReport, title: str) -> str:
    """Markdown: median of each headline metric per variant and time point, the control's median in brackets,
    and † on a cell whose check is not resolved at the audit's node count (status ``unresolved``)."""
    s = report.summary(field=None)
    s = s[s["status"] == "ok"]
    opts = report.header["options"]
    nodes = ", ".join(f"{path} {n}" for path, n in (opts.get("loop_points") or {}).items())
    unresolved = {
        (c["diagnostic"], c["variant"], c["time_key"]) for c in report.verdict.checks if c["status"] == "unresolved"
    }
    lines = [
        f"## {title}",
        "",
        f"model `{report.header['model'].get('reference')}`, {opts['n_samples']} samples per time point"
        + (f", nodes per loop: {nodes}" if nodes else "")
        + f"; verdict: **{report.verdict}**",
        "",
    ]
    for diagnostic, metric, label in HEADLINE:
        sub = s[(s["diagnostic"] == diagnostic) & (s["metric"] == metric)]
        if sub.empty:
            continue
        keys = list(dict.fromkeys(sub.sort_values("t")["time_key"]))
        lines += [
            f"**{label}** — median over samples (the conservative control's median in brackets)",
            "",
            "| variant | " + " | ".join(report.time_label(k) for k in keys) + " |",
            "|---" * (len(keys) + 1) + "|",
        ]
        for variant in dict.fromkeys(sub["variant"]):
            cells = []
            for key in keys:
                at = sub[(sub["variant"] == variant) & (sub["time_key"] == key)]
                model, ctrl = at[at["field"] == "model"], at[at["field"] == "control"]
                cell = f"{float(model['median'].iloc[0]):.3g}" if len(model) else "–"
                cell += f" ({float(ctrl['median'].iloc[0]):.2g})" if len(ctrl) else ""
                cells.append(cell + (" †" if (diagnostic, variant, key) in unresolved else ""))
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    if unresolved:
        lines += [
            "† not resolved: the check's floor is set by the quadrature (too few nodes per loop for this loop at "
            "this noise level), not by rounding, and the model's median is within 10× of it — the value says "
            "nothing about the model; run with more nodes (`--points`).",
            "",
        ]
    return "\n".join(lines)


def run(model, out: pathlib.Path, name: str, **options) -> AuditReport:
    """Audit ``model`` (a reference or a probe), save ``<name>.json`` and its figures under ``out/<name>/``."""
    print(f"auditing {name} …", flush=True)
    report = audit(model, **options)
    report.to_json(out / f"{name}.json")
    figures = plot_report(report, out / name)
    print(f"  verdict: {report.verdict}\n  {len(figures)} figures in {out / name}", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=None, help="output folder (default: out/figures-paper, with --quick out/figures-paper-quick)"
    )
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--quick", action="store_true", help="smoke run: 4 samples, 32 nodes, 2 time points")
    form.add_argument(
        "--full", action="store_true", help="the paper's protocol: 256 samples, 1000 nodes, 21 time indices"
    )
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="image model for Figs. 2/5/7 (repeatable; default embedded:digits), "
        "e.g. google/ddpm-cifar10-32, google/ncsnpp-celebahq-256",
    )
    parser.add_argument("--no-funnel", action="store_true", help="skip the funnel audit (Figs. 3, 4, 12)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    require("examples/reproduce_figures.py", "examples", "matplotlib", "sklearn")
    mode = "quick" if args.quick else "full" if args.full else "reduced"
    out = output_folder(args.out or OUT / ("figures-paper-quick" if args.quick else "figures-paper"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="conservcheck-figures-") as scratch:
        figures(args, mode, out, pathlib.Path(scratch))


def figures(args: argparse.Namespace, mode: str, out: pathlib.Path, scratch: pathlib.Path) -> None:
    """Every audit of the chosen form, its figures, and ``numbers.md`` in ``out``."""
    n_samples, n_points, indices, times = FORMS[mode]
    common = dict(n_samples=n_samples, n_points=n_points, seed=args.seed)  # the probes carry the device

    sections = []
    for ref in args.model or ["embedded:digits"]:
        probe = load_reference(ref, device=args.device)
        opts = dict(common, paths="rotation,brownian,projection", curl="subjacobian")
        if isinstance(probe.time_convention, DiscreteSchedule):
            opts["time_indices"] = indices  # the paper's axis: the time index k of a 1000-step schedule
        if ref == "embedded:digits":
            opts["data"] = digits_data(scratch)
        name = ref.replace("embedded:", "").replace("/", "--")
        sections.append(numbers_table(run(probe, out, name, **opts), f"Figs. 2, 5, 7 — {ref}"))

    if not args.no_funnel:
        funnel = load_reference("embedded:funnel", device=args.device)
        funnel_opts = dict(
            common,
            paths="rotation,brownian,projection",
            curl="subjacobian",
            stein=FUNNEL_REFERENCE,
            data=funnel_data(scratch, funnel, 4096, args.seed),
        )
        if mode == "reduced":
            funnel_opts["n_samples"] = 64
        if times:
            funnel_opts["times"] = times
        sections.append(
            numbers_table(
                run(funnel, out, "funnel", **funnel_opts), "Figs. 3, 4, 12 — embedded:funnel against its exact score"
            )
        )

    header = [
        f"# Paper figure types — {mode} form",
        "",
        f"Command: `python examples/reproduce_figures.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "Figures: one folder per audit beside this file (redraw with `conservcheck plot <name>.json --out <name>`).",
        "",
    ]
    (out / "numbers.md").write_text("\n".join(header + sections) + "\n", encoding="utf-8")
    print(f"numbers written to {out / 'numbers.md'}", flush=True)


if __name__ == "__main__":
    main()
