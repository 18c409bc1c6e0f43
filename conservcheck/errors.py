"""Errors that reach users.

Every error a user can cause is a :class:`ConservcheckError` whose message names the problem and
whose ``hint`` names the fix. The CLI prints ``error: <message> (<hint>)`` on one line and exits with
code 2; library callers catch the class.

Exit codes of every command (docs/cli.md): :data:`EXIT_OK` done (a verdict of any kind, a gate that does
not hold), :data:`EXIT_GATE` a ``--fail-if`` condition holds (or a self-test check misses),
:data:`EXIT_USAGE` a usage or input error, :data:`EXIT_INTERNAL` an internal error (a bug: one line, the
traceback in a log file or with ``--debug``), :data:`EXIT_INTERRUPTED` Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_GATE = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class ConservcheckError(Exception):
    """A user-facing failure: bad input, a model that cannot be loaded, a broken probe."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(ConservcheckError):
    """Arguments that cannot work together or are out of range."""


class ModelLoadError(ConservcheckError):
    """A model reference that cannot be resolved or loaded."""


class ProbeContractError(ConservcheckError):
    """A probe whose outputs break the contract (shape, finiteness, determinism)."""


def error_chain(err: BaseException) -> list[BaseException]:
    """``err`` and its causes / contexts, outermost first (libraries wrap the error a user must see)."""
    out: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and all(e is not seen for seen in out):
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def reason(err: BaseException) -> str:
    """``Type: first line`` of an exception, for one-line messages (at most 240 characters of it).

    torch's weights-only unpickling errors give their ``WeightsUnpickler error`` part, up to its first
    sentence (the rest is advice on ``torch.load`` that does not apply here).
    """
    text = str(err)
    m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if m:
        line = m.group(1).split(". ")[0]
    else:
        line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line.strip()[:240]
    return f"{type(err).__name__}: {line}" if line else type(err).__name__
