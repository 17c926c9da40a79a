#!/usr/bin/env bash
# The checks that need a GPU, in one short run on a machine with CUDA (a few minutes on one H100 or
# H200): the CUDA tests (bf16 autocast, fused AdamW, the lean kernels, NF4 on the device), then every
# method's step against the reference at the benchmarks' shapes. Writes the "methods-cuda" section of
# BENCHMARKS.md; the CPU sections stay as they are. MODEL=DIR runs the steps on another model of the
# default's shape (a folder), where the default model's file cannot be had.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY -m pytest -q tests/test_cuda.py tests/test_kernels.py
$PY bench/methods.py --device cuda --rows lora,lora0,full,qlora,prompt,prefix --workloads text,sentiment --steps 12 \
    --model "${MODEL:-smollm2-135m}"
