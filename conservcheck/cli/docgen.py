"""The command-line reference, ``docs/cli-reference.md``, rendered from the typer app so it cannot drift.

Every command of :data:`conservcheck.cli.app.app` becomes one section: its help text, its usage line and one
table row per argument and option, with the option names, metavar, help and default exactly as
``conservcheck <command> --help`` prints them (the rows are click's own help records).

    python -m conservcheck.cli.docgen > docs/cli-reference.md        # regenerate after changing the CLI
    python -m conservcheck.cli.docgen --check docs/cli-reference.md  # exit 1 when the file is stale

typer is imported here only, like in the rest of :mod:`conservcheck.cli`; importing ``conservcheck`` does not load it.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

REGENERATE = "python -m conservcheck.cli.docgen > docs/cli-reference.md"


def _cell(text: str) -> str:
    """Markdown table cell text: pipes escaped, ``<`` as an entity (``<name>`` is not an HTML tag)."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;")


def _code(text: str) -> str:
    """A code span inside a table cell (pipes still need escaping there)."""
    return "`" + text.replace("|", "\\|") + "`"


def _help(command: Any) -> str:
    """The command's help text as ``--help`` shows it: dedented, cut at click's ``\\f`` marker."""
    text = inspect.cleandoc(command.help or "")
    return text.split("\f")[0].strip()


def _section(command: Any, ctx: Any, path: str) -> list[str]:
    """Markdown for one command: heading, help, usage, then arguments and options tables."""
    usage = " ".join([path, *command.collect_usage_pieces(ctx)])
    lines = [f"## `{path}`", ""]
    if _help(command):
        lines += [_help(command), ""]
    lines += ["```", usage, "```", ""]
    arguments: list[tuple[str, str]] = []
    options: list[tuple[str, str]] = []
    params = list(command.get_params(ctx))
    for param in params:
        record = param.get_help_record(ctx)
        if record is None:
            continue
        (arguments if param.param_type_name == "argument" else options).append(record)
    for title, records in (("argument", arguments), ("option", options)):
        if not records:
            continue
        lines += [f"| {title} | description |", "|---|---|"]
        lines += [f"| {_code(name)} | {_cell(text)} |" for name, text in records]
        lines.append("")
    return lines


def render() -> str:
    """The whole reference as Markdown: the root command, then each subcommand in registration order."""
    import typer.main
    from typer.core import TyperGroup

    from conservcheck.cli.app import app

    root = typer.main.get_command(app)
    assert isinstance(root, TyperGroup), "an app with subcommands is a group"
    ctx = root.make_context("conservcheck", ["--help"], resilient_parsing=True)
    names = root.list_commands(ctx)
    lines = [
        "# Command-line reference",
        "",
        f"<!-- Generated from conservcheck.cli.app by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "Every command, argument and option of `conservcheck`, as `conservcheck <command> --help` prints them. "
        "The guide to using them — output streams, exit codes, the `--fail-if` grammar, examples — is "
        "[cli.md](cli.md).",
        "",
        "Commands: " + " · ".join(f"[`{n}`](#conservcheck-{n})" for n in names),
        "",
    ]
    lines += _section(root, ctx, "conservcheck")
    for name in names:
        command = root.get_command(ctx, name)
        if command is None or getattr(command, "hidden", False):
            continue
        sub = command.make_context(name, [], parent=ctx, resilient_parsing=True)
        lines += _section(command, sub, f"conservcheck {name}")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the reference, or with ``--check FILE`` compare it with FILE (exit 1 and say how to fix)."""
    args = list(sys.argv[1:] if argv is None else argv)
    text = render()
    if not args:
        sys.stdout.write(text)
        return 0
    if len(args) == 2 and args[0] == "--check":
        path = Path(args[1])
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return 0
        print(f"error: {path} is not the reference of this CLI (regenerate it: {REGENERATE})", file=sys.stderr)
        return 1
    print("error: usage: python -m conservcheck.cli.docgen [--check FILE]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
