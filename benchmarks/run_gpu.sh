#!/usr/bin/env bash
# Runs benchmarks/gpu_epoch.py and benchmarks/gpu_cohort.py on a GPU machine, from the
# repository root:
#
#   bash benchmarks/run_gpu.sh [extra gpu_epoch.py arguments]
#   BENCH=cohort bash benchmarks/run_gpu.sh            # only gpu_cohort.py (< 5 min)
#   BENCH=epoch COHORT_ARGS="--ks 1 16" bash ...       # BENCH: epoch, cohort or "epoch cohort"
#
# $BENCH (default "epoch cohort") picks the scripts: gpu_epoch.py under a timeout of 290 s,
# gpu_cohort.py under one of 210 s (its --budget-s is 180; about a minute on a GPU), so
# both take up to about 8.5 minutes plus any install; where one command may run at most
# 10 minutes, run BENCH=epoch and BENCH=cohort as two commands. Extra arguments go to
# gpu_epoch.py, $COHORT_ARGS to gpu_cohort.py. Writes $OUT/gpu_epoch.{json,log} and
# $OUT/gpu_cohort.{json,log} ($OUT defaults to .).
# Python: $PYTHON if set, else python3. If it already has JAX on a GPU plus
# orchard_jax's imports (flax, optax, optuna, torch), nothing is installed.
# Wheels in .whl/ (for a machine without network) are installed first, into
# /tmp/orchard_site; `bash benchmarks/run_gpu.sh --fetch-wheels`, run on a
# machine with network, puts there the two that import orchard_jax needs and
# CUDA images usually lack (optuna, colorlog; pure Python). Failing all that,
# it tries a networked install into a venv at /tmp/orchard-gpu-venv: CPU torch
# (only the DataLoader is used) and, if JAX has no GPU, jax[cuda12].
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-.}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  "$PY" -m pip download --no-deps --only-binary=:all: -d .whl optuna==5.0.0 colorlog==6.12.0
  exit 0
fi

gpu_ok() { "$1" -c "import jax; assert jax.default_backend() == 'gpu', jax.default_backend()" 2>/dev/null; }
deps_ok() { "$1" -c "import flax, optax, optuna, torch, orchard_jax" 2>/dev/null; }

nvidia-smi -L 2>/dev/null || echo "nvidia-smi not available"

if compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing carried wheels:" .whl/*.whl
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/orchard_site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/orchard_site"
fi

if ! { gpu_ok "$PY" && deps_ok "$PY"; }; then
  echo "$PY lacks JAX on a GPU or orchard_jax's imports; trying a networked install"
  VENV=/tmp/orchard-gpu-venv
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv --system-site-packages "$VENV"
  PY="$VENV/bin/python"
  {
    "$PY" -c "import torch" 2>/dev/null ||
      "$PY" -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    if gpu_ok "$PY"; then "$PY" -m pip install -q -e .; else "$PY" -m pip install -q -e . "jax[cuda12]"; fi
  } || { echo "install failed (no network?); carry wheels in .whl/, see the top of this script"; exit 3; }
  deps_ok "$PY" || { echo "orchard_jax still does not import:"; "$PY" -c "import orchard_jax"; exit 3; }
  gpu_ok "$PY" || echo "WARNING: JAX has no GPU backend here; figures will be for $("$PY" -c 'import jax; print(jax.default_backend())')"
fi

mkdir -p "$OUT_DIR"
echo "python: $PY"
BENCH="${BENCH:-epoch cohort}"
status=0
if [[ " $BENCH " == *" epoch "* ]]; then
  timeout -k 15 290 "$PY" benchmarks/gpu_epoch.py --json "$OUT_DIR/gpu_epoch.json" "$@" 2>&1 |
    tee "$OUT_DIR/gpu_epoch.log" || status=$?
fi
if [[ " $BENCH " == *" cohort "* ]]; then
  # shellcheck disable=SC2086  # COHORT_ARGS is a list of words
  timeout -k 15 210 "$PY" benchmarks/gpu_cohort.py --json "$OUT_DIR/gpu_cohort.json" \
    ${COHORT_ARGS:-} 2>&1 | tee "$OUT_DIR/gpu_cohort.log" || status=$?
fi
exit "$status"
