#!/usr/bin/env bash
# One-call GPU check of issue 16: sampling img/s and TFLOP/s of the four official configs
# (plain, default and fastest paths, with their error against fp32), training img/s and
# evaluator activations/s, each beside the original code's H100 number, the ratio and the
# target; a summary table at the end. Under 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh               # a GPU machine with the CUDA build of torch
#   bash benchmarks/gpu_check.sh --dry-run     # tiny configs on the CPU (the test suite)
#   bash benchmarks/gpu_check.sh --configs ffhq_128 --sections sample   # a rerun of a part
#
# Python: $PYTHON if set, else the repository's .venv, else python3. Exit status 1 when a
# measurement failed (the others still ran), 2 without a GPU outside --dry-run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" "$root/benchmarks/gpu_check.py" "$@"
