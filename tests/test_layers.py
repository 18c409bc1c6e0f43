"""The package's layers: data flows one way, model reference → adapter → probe → geometry → diagnostics →
report → runner → CLI, and every import points down (or within its own package), never up or sideways.

The rules are read from the source (every ``import`` statement, at module level or inside a function),
so a lazy import cannot hide a back-edge; there is no exception list.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "conservcheck"

#: Layer of each top-level module or sub-package, lowest first. A module may import modules of lower
#: layers and of its own package; nothing of a higher layer and nothing of another package on its layer.
LAYERS: dict[str, int] = {
    # core units: errors, settings, randomness, files, precision, processes, parameterizations, the probe
    **dict.fromkeys(
        [
            "errors",
            "version",
            "rng",
            "settings",
            "plugins",
            "files",
            "safe_load",
            "precision",
            "process",
            "parameterization",
            "conditioning",
            "probe",
            "contract",
            "batching",
            "timepoints",
        ],
        0,
    ),
    # pure tensor geometry, analytic fields, our own network architectures
    "geometry": 1,
    "analytic": 1,
    "networks": 1,
    # model references → probes; clean samples x0
    "adapters": 2,
    "x0": 2,
    # the diagnostics and their registry
    "diagnostics": 3,
    # reports, verdicts, gates, figures
    "report": 4,
    # the audit (options, plan, units, journal, merge) and the known-answer self-test
    "runner": 5,
    # what users run: the command line, and the streaming metric for training loops
    "selftest": 5,
    "cli": 6,
    "metrics": 6,
    "__init__": 7,
}
#: Within the core, the order in which its modules may import each other.
CORE_ORDER = [
    "errors",
    "version",
    "rng",
    "settings",
    "plugins",
    "files",
    "safe_load",
    "precision",
    "process",
    "parameterization",
    "conditioning",
    "probe",
    "contract",
    "batching",
    "timepoints",
]
MODEL_LIBRARIES = ("diffusers", "transformers", "accelerate")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(["conservcheck", *parts]) if parts != ["__init__"] else "conservcheck"] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    own = [k for k, v in MODULES.items() if v == path][0]
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            members = {f"{base}.{a.name}" for a in node.names}
            # `from package import module` depends on that module (and the package's __init__ it runs);
            # `from module import name` on the module.
            names |= (members & MODULES.keys()) or {base}
    return names


def _unit(module: str) -> str:
    """The layer unit of a module: its top-level package or module name under conservcheck."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in MODULES.items():
        for name in _imports(path):
            if name == "conservcheck" or name.startswith("conservcheck."):
                target = name
                while target not in MODULES:
                    target = target.rpartition(".")[0]
                if target != module:
                    edges[module].add(target)
    return edges


EDGES = _edges()


def test_every_module_has_a_layer():
    assert sorted({_unit(m) for m in MODULES} - set(LAYERS)) == []


def test_imports_point_down_or_within_their_own_package():
    wrong = []
    for module, targets in EDGES.items():
        src = _unit(module)
        for target in targets:
            dst = _unit(target)
            if src == dst:
                continue
            if LAYERS[dst] > LAYERS[src] or (LAYERS[dst] == LAYERS[src] and LAYERS[src] != 0):
                wrong.append(f"{module} → {target}")
            elif LAYERS[src] == LAYERS[dst] == 0 and CORE_ORDER.index(dst) > CORE_ORDER.index(src):
                wrong.append(f"{module} → {target} (core order)")
    assert wrong == []


def test_no_import_cycles():
    """No cycle among modules (imports inside functions included), and none among packages."""
    seen: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(EDGES.get(node, ())):
            if nxt == "conservcheck":
                continue
            if seen.get(nxt) == 1:
                cycles.append(" → ".join(stack[stack.index(nxt) :] + [nxt]) if nxt in stack else nxt)
            elif nxt not in seen:
                visit(nxt, [*stack, nxt])
        seen[node] = 2

    for module in sorted(MODULES):
        if module not in seen:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("library", MODEL_LIBRARIES)
def test_only_adapters_and_networks_import_model_libraries(library):
    offenders = [
        m
        for m, p in MODULES.items()
        if _unit(m) not in ("adapters", "networks")
        and any(n == library or n.startswith(library + ".") for n in _imports(p))
    ]
    assert offenders == []


def test_no_top_level_module_named_adapters():
    """Another PyPI package owns the name ``adapters``: ours lives at conservcheck.adapters only."""
    root = PACKAGE.parent
    assert not (root / "adapters").exists() and not (root / "adapters.py").exists()


def test_importing_the_library_does_not_import_cli_or_model_libraries():
    code = (
        "import sys, conservcheck, conservcheck.runner.audit, conservcheck.report.gate, conservcheck.x0.data, "
        "conservcheck.x0.model_samples, conservcheck.analytic.fields, conservcheck.selftest; "
        "print([m for m in ('typer', 'rich', 'click', 'matplotlib', 'diffusers', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
