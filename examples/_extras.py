"""What every example shares: the extra it needs, and where it may write.

Each example checks, before any work, that the packages of its extra are importable and otherwise stops
with one line naming the install command. Examples write under ``out/`` in the repository (git-ignored)
unless ``--out`` says otherwise, and never into the models shipped inside the package
(``conservcheck/assets``) unless asked to with ``--replace-shipped``.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: Default parent of every example's output (ignored by git).
OUT = ROOT / "out"
ASSETS = ROOT / "conservcheck" / "assets"
#: Import name → distribution name of the packages the extras add.
DISTRIBUTIONS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}


def require(script: str, extra: str, *modules: str) -> None:
    """Stop with one line (exit 2) when a module of ``extra`` is missing."""
    missing = [DISTRIBUTIONS.get(m, m) for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f'error: {script} needs {", ".join(missing)}: pip install -e ".[{extra}]" (in the repository root)',
            file=sys.stderr,
        )
        raise SystemExit(2)


def output_folder(path: str | pathlib.Path, replace_shipped: bool = False) -> pathlib.Path:
    """``path`` as the folder to write, refused (exit 2) inside the package's shipped models unless
    ``replace_shipped``: the package's own tests check those files."""
    folder = pathlib.Path(path).expanduser().resolve()
    if not replace_shipped and (folder == ASSETS or ASSETS in folder.parents):
        print(
            f"error: {path} is inside the models shipped with the package ({ASSETS}); write elsewhere, "
            "or pass --replace-shipped to regenerate them",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return folder
