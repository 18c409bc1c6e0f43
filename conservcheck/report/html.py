"""A report as one self-contained HTML page: verdict, tables, the paper's figures, provenance, baseline.

:func:`render` returns the page as a string; nothing in it is fetched from anywhere: the figures are PNG
``data:`` URIs (drawn by :func:`conservcheck.report.plots.plot_report`), the style sheet is inline, there is
no script, and a Content-Security-Policy forbids any other source, so the file can be mailed, attached to
a CI run or opened offline. Sections, in order:

1. the verdict and its one-line reason (and the gate's conditions, when a gate ran);
2. the comparison with a baseline report, when one was given: the ratio of medians per time point with its
   95% bootstrap interval (:mod:`conservcheck.report.baseline`);
3. the headline medians per time point, and one table per diagnostic variant (the console's tables);
4. the figures (metric against time with the conservative control; box plots per time point);
5. the model and provenance block, and the problems the audit recorded.

Without matplotlib the page says how to get the figures and has everything else.
"""

from __future__ import annotations

import base64
import html
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from conservcheck import diagnostics
from conservcheck.errors import UsageError
from conservcheck.files import write_atomic
from conservcheck.report.audit_report import AuditReport
from conservcheck.report.baseline import Comparison
from conservcheck.report.views import TextTable, comparison_tables, diagnostic_tables, headline_table, provenance
from conservcheck.version import __version__

if TYPE_CHECKING:
    from conservcheck.report.gate import GateResult

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
:root { --ink: #1d232b; --muted: #5b6573; --line: #d9dee5; --bad: #b42318; --bad-bg: #fde8e6;
        --good: #1a7f37; --good-bg: #e6f4ea; --warn: #9a6700; --warn-bg: #fff4d6; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       margin: 0 auto; max-width: 1180px; padding: 24px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 32px 0 8px; border-bottom: 1px solid var(--line);
     padding-bottom: 4px; } h3 { font-size: 14px; margin: 20px 0 6px; }
.muted { color: var(--muted); }
.verdict { display: inline-block; font-weight: 700; padding: 2px 10px; border-radius: 4px; margin-right: 8px; }
.verdict.pass { color: var(--good); background: var(--good-bg); }
.verdict.violation { color: var(--warn); background: var(--warn-bg); }
.verdict.invalid, .verdict.failed { color: var(--bad); background: var(--bad-bg); }
table { border-collapse: collapse; margin: 6px 0 14px; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 8px; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { font-weight: 600; background: #f6f8fa; }
td.bad { color: var(--bad); background: var(--bad-bg); font-weight: 600; }
table.kv td { text-align: left; white-space: normal; } table.kv td:first-child { color: var(--muted); width: 160px; }
.scroll { overflow-x: auto; }
figure { display: inline-block; width: calc(50% - 12px); margin: 8px 8px 16px 0; vertical-align: top; }
figure img { width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 12px; }
@media (max-width: 800px) { figure { width: 100%; } }
nav a { margin-right: 14px; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _table(table: TextTable, caption: bool = True) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in table.columns)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="bad">{_e(c)}</td>' if bad else f"<td>{_e(c)}</td>" for c, bad in zip(row, flags))
        + "</tr>"
        for row, flags in zip(table.rows, table.flags)
    )
    title = f"<h3>{_e(table.title)}</h3>" if caption else f'<p class="muted">{_e(table.title)}</p>'
    return f'{title}<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _caption(name: str) -> tuple[str, str]:
    """(caption, alt text) of a figure file stem ``<diagnostic>_<metric>[_box]`` from plot_report."""
    box = name.endswith("_box")
    stem = name[: -len("_box")] if box else name
    diag, _, metric = stem.partition("_")
    label = metric
    spec = diagnostics.registered().get(diag)
    if spec is not None:
        label = next((f.label for f in spec.figures if f.metric == metric), metric)
    if box:
        text = f"{diag}: {metric} per sample — one box per time point, one panel per variant"
    else:
        text = f"{diag}: {label} against time — median and q25–q75 band per variant, the conservative control dashed"
    return text, f"{diag} {metric}" + (" box plots" if box else " against time")


def figures(report: AuditReport) -> list[tuple[str, str, bytes]]:
    """The report's figures as (caption, alt text, PNG bytes); raises :class:`UsageError` without matplotlib."""
    from conservcheck.report.plots import plot_report

    with tempfile.TemporaryDirectory(prefix="conservcheck-html-") as tmp:
        return [(*_caption(p.stem), p.read_bytes()) for p in plot_report(report, tmp, "png")]


def _figures_section(report: AuditReport) -> str:
    try:
        found = figures(report)
    except UsageError as err:
        return f'<p class="muted">No figures: {_e(err)}</p>'
    out = []
    for caption, alt, png in found:
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        out.append(f'<figure><img src="{uri}" alt="{_e(alt)}"><figcaption>{_e(caption)}</figcaption></figure>')
    return "".join(out)


def _model_name(report: AuditReport) -> str:
    m = report.header.get("model", {})
    return str(m.get("reference") or m.get("name") or "model")


def render(
    report: AuditReport,
    *,
    baseline: AuditReport | None = None,
    comparisons: Sequence[Comparison] | None = None,
    baseline_name: str | None = None,
    results: Sequence[GateResult] = (),
) -> str:
    """The page (module doc). ``comparisons`` are the baseline comparisons to show (by default every
    headline metric both reports hold, :func:`conservcheck.report.baseline.headline_comparisons`)."""
    from conservcheck.report.baseline import headline_comparisons

    name = _model_name(report)
    status = report.verdict.status
    nav = ['<a href="#verdict">verdict</a>']
    body = [
        '<section id="verdict">',
        f"<h1>conservcheck report — {_e(name)}</h1>",
        f'<p><span class="verdict {_e(status)}">{_e(status)}</span>{_e(report.verdict.reason)}</p>',
    ]
    if results:
        failed = any(r.holds for r in results)
        word = "gate failed" if failed else "gate passed"
        body.append(f'<p><span class="verdict {"failed" if failed else "pass"}">{word}</span></p>')
        rows = "".join(
            f'<tr><td>{_e(r.expression.text)}</td><td class="{"bad" if r.holds else ""}">'
            f"{'holds' if r.holds else 'does not hold'}</td><td>{'<br>'.join(_e(d) for d in r.details[:10])}</td></tr>"
            for r in results
        )
        body.append(
            '<table class="kv"><thead><tr><th>condition</th><th>result</th><th>values</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>"
        )
    body.append("</section>")
    if baseline is not None:
        comps = list(comparisons) if comparisons is not None else headline_comparisons(report, baseline)
        nav.append('<a href="#baseline">baseline</a>')
        label = f" <code>{_e(baseline_name)}</code>" if baseline_name else ""
        body += [
            '<section id="baseline">',
            f"<h2>Against the baseline{label}</h2>",
            f'<p class="muted">baseline: {_e(_model_name(baseline))}, verdict {_e(baseline.verdict)}</p>',
            '<p class="muted">the ratio of medians with its 95% bootstrap interval (flagged: the whole interval '
            "lies above 1, worse beyond sampling noise)</p>",
            "".join(_table(t) for t in comparison_tables(report, comps)) if comps else "<p>No metric in common.</p>",
            "</section>",
        ]
    nav += ['<a href="#tables">tables</a>', '<a href="#figures">figures</a>', '<a href="#provenance">provenance</a>']
    headline = headline_table(report)
    body += ['<section id="tables">', "<h2>Diagnostics</h2>"]
    if headline.rows:
        body.append(_table(headline, caption=False))
    body += [_table(t) for t in diagnostic_tables(report)]
    body += ["</section>", '<section id="figures">', "<h2>Figures</h2>", _figures_section(report), "</section>"]
    kv = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in provenance(report))
    body += ['<section id="provenance">', "<h2>Model and provenance</h2>", f'<table class="kv">{kv}</table>']
    problems = report.header.get("problems") or []
    if problems:
        body += ["<h3>Problems</h3><ul>"] + [f"<li>{_e(p)}</li>" for p in problems] + ["</ul>"]
    body.append("</section>")
    footer = f'<footer class="muted"><p>conservcheck {_e(__version__)}</p></footer>'
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>conservcheck — {_e(name)} — {_e(status)}</title><style>{STYLE}</style></head>\n"
        f"<body><nav>{''.join(nav)}</nav>\n" + "\n".join(body) + f"\n{footer}</body></html>\n"
    )


def write_html(path: str | Path, report: AuditReport, **kwargs: object) -> Path:
    """Write :func:`render`'s page to ``path`` atomically; returns the path."""
    write_atomic(path, render(report, **kwargs))  # type: ignore[arg-type]
    return Path(path)


__all__ = ["CSP", "figures", "render", "write_html"]
