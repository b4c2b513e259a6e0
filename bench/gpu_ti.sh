#!/usr/bin/env bash
# Per-image TI throughput on an SD1.5-shaped model (random weights, built in code) at 512 px in
# bf16 on CUDA: the sequential diffusers-example-style loop vs the batched engine, with it/s,
# image-steps/s and achieved TFLOP/s (FLOPs from torch.utils.flop_counter.FlopCounterMode).
#
# Usage: bench/gpu_ti.sh [extra ti_throughput.py options, e.g. --ns 8,16,32 --steps 10]
# Needs a CUDA GPU with >= 40 GiB for N = 16 (add --gradient-checkpointing on smaller cards).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_ti.sh: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'torch missing')); this benchmark needs an NVIDIA GPU. For the CPU benchmark run: $PY bench/ti_throughput.py" >&2
    exit 2
fi

"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")'
exec "$PY" bench/ti_throughput.py \
    --model sd15 --device cuda --resolution 512 --mixed-precision bf16 \
    --ns 4,8,16 --steps 5 --repeats 2 --vectors 1 --flops "$@"
