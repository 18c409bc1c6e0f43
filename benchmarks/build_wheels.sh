#!/usr/bin/env bash
# Build the wheels a machine that already has torch needs to run the benchmarks: this project and every
# dependency of it that torch does not bring, pinned to the versions installed in this environment.
#
#   benchmarks/build_wheels.sh [VENV_PYTHON]            # wheels for this machine's Python
#   PYTHON_VERSIONS="3.10 3.12" benchmarks/build_wheels.sh   # plus binary wheels for other Pythons
#
# Writes .whl/ at the repository root (ignored by git; carry it to a lent machine: carry [".whl"]).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
py="${1:-${PYTHON:-/work/venv/bin/python}}"
out="$root/.whl"
mkdir -p "$out"
# Distributions conservcheck needs beyond torch's own closure, with their installed versions.
reqs="$("$py" - <<'PY'
import importlib.metadata as md
from packaging.requirements import Requirement

def closure(name, seen):
    key = name.lower().replace("_", "-")
    if key in seen:
        return
    seen.add(key)
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return
    for r in dist.requires or []:
        req = Requirement(r)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            closure(req.name, seen)

need, torch_deps = set(), set()
closure("conservcheck", need)
closure("torch", torch_deps)
for name in sorted(need - torch_deps - {"conservcheck"}):
    print(f"{name}=={md.version(name)}")
PY
)"
echo "$reqs" > "$out/requirements.txt"
"$py" -m pip wheel --no-deps -q -w "$out" $reqs
"$py" -m pip wheel --no-deps -q -w "$out" "$root"
for v in ${PYTHON_VERSIONS:-}; do
    "$py" -m pip download --no-deps -q --only-binary=:all: --python-version "$v" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$out" $reqs
done
ls "$out" | wc -l | xargs echo "wheels in $out:"
