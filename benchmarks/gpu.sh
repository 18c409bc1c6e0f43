#!/usr/bin/env bash
# Run the benchmarks on a machine that has torch but neither diffusers nor this project.
#
#   benchmarks/gpu.sh [STAGE ...]                 # stages below; default: all GPU stages
#   benchmarks/gpu.sh --device cpu --small all    # the smallest configurations (checks the script on a CPU)
#
# Needs the wheels of benchmarks/build_wheels.sh in .whl/ (carried with the working tree). Installs them
# into a venv with --system-site-packages beside the interpreter's torch (PYTHON, default python3), puts
# this working tree first on PYTHONPATH, and writes every benchmark's output and JSON lines to $OUT
# (default ./out). Stages (each fits a 10-minute command on one H100):
#   paths-tf32 paths-fp32 paths-bf16   ddpm-cifar10 loops, 256 samples × 1000 nodes
#   paths-256                          the 256×256 DDPM architecture, 4 samples × 1000 nodes, tf32
#   curl                               Hutchinson vs 64×64 sub-Jacobian on ddpm-cifar10, 64 samples
#   accuracy                           rules vs a 4096-node reference, ddpm-cifar10 in fp64
#   audit                              the whole paper protocol on ddpm-cifar10, tf32
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-$root/out}"
py="${PYTHON:-python3}"
venv="${BENCH_VENV:-/tmp/conservcheck-bench}"
device=cuda
small=0
stages=()
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --small) small=1; shift ;;
        *) stages+=("$1"); shift ;;
    esac
done
if [ ${#stages[@]} -eq 0 ] || [ "${stages[0]}" = all ]; then
    stages=(paths-tf32 paths-fp32 paths-bf16 paths-256 curl accuracy audit)
fi
mkdir -p "$out"

if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv --system-site-packages "$venv"
    # The interpreter holding torch may itself be a venv, whose packages --system-site-packages does not
    # see: a .pth file adds its site-packages explicitly.
    vsite="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$py" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])' | sort -u \
        > "$vsite/_base_site.pth"
    # --no-deps: the pinned closure is complete, and resolving would re-check torch's own requirements.
    "$venv/bin/python" -m pip install -q --no-index --no-deps --find-links "$root/.whl" \
        -r "$root/.whl/requirements.txt" conservcheck
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
bpy="$venv/bin/python"
"$bpy" -c 'import torch, diffusers, conservcheck; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "diffusers", diffusers.__version__, "conservcheck from", conservcheck.__file__)' \
    | tee "$out/versions.txt"
command -v nvidia-smi > /dev/null && nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true

json="$out/results.jsonl"
run() {  # run NAME ARGS...: one benchmark, its table to $out/NAME.txt
    local name="$1"; shift
    echo "== $name: $*"
    "$bpy" "$@" --device "$device" --json "$json" 2>&1 | tee "$out/$name.txt"
}
b="$root/benchmarks"
for stage in "${stages[@]}"; do
    if [ "$small" = 1 ]; then
        case "$stage" in
            paths-tf32|paths-fp32|paths-bf16) run "$stage" "$b/bench_paths.py" --arch tiny-16 --precision "${stage#paths-}" --samples 2 --points 16 --repeats 1 ;;
            paths-256) run "$stage" "$b/bench_paths.py" --arch tiny-16 --samples 1 --points 16 --repeats 1 --paths rotation ;;
            curl) run "$stage" "$b/bench_curl.py" --arch tiny-16 --samples 2 --block 8 --probes 4 --repeats 1 ;;
            accuracy) run "$stage" "$b/bench_accuracy.py" --arch tiny-16 --samples 1 --paths rotation --reference-points 64 ;;
            audit) run "$stage" "$b/bench_audit.py" --arch tiny-16 --samples 2 --points 16 --times 1 --sampler-steps 4 --repeats 1 ;;
            *) echo "unknown stage $stage" >&2; exit 2 ;;
        esac
        continue
    fi
    case "$stage" in
        paths-tf32|paths-fp32|paths-bf16) run "$stage" "$b/bench_paths.py" --arch ddpm-cifar10 --precision "${stage#paths-}" --samples 256 --points 1000 ;;
        paths-256) run "$stage" "$b/bench_paths.py" --arch ddpm-256 --precision tf32 --samples 4 --points 1000 --repeats 1 ;;
        curl) run "$stage" "$b/bench_curl.py" --arch ddpm-cifar10 --precision fp32 --samples 64 ;;
        accuracy) run "$stage" "$b/bench_accuracy.py" --arch ddpm-cifar10 --samples 4 ;;
        audit) run "$stage" "$b/bench_audit.py" --arch ddpm-cifar10 --precision tf32 --samples 256 --points 1000 --times 10 --repeats 1 ;;
        *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
done
