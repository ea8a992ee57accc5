#!/usr/bin/env bash
# The speed benchmark's GPU run (README, "Performance"), prepared for a GPU machine that has no
# network but whose Python already holds CUDA builds of jax and torch, transformers and peft (as
# the lent H100/H200 machines' image does): ftjax's one other import on this path, ml_collections,
# travels as a wheel, and ftjax itself runs from the checkout.
#
#   scripts/bench/gpu_speed.sh wheels               # with network: ml_collections into .whl/
#   scripts/bench/gpu_speed.sh run [speed.py args]  # on the GPU machine, from the repository root
#
# `run` installs .whl/ into a scratch site directory, prints the GPU and the versions it found,
# then runs `speed.py --workloads=llama-lora --llama-size=1b --dtypes=bfloat16` (a ~1B decoder,
# LoRA, bfloat16, against torch on the same GPU) unless other speed.py arguments are given, and
# writes its JSON and markdown table to $OUT (or workdirs/bench). PYTHON overrides `python3`.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
WHEELS=.whl
SITE=${TMPDIR:-/tmp}/ftjax_gpu_site

case "${1:-}" in
  wheels)
    # Pure-Python wheels: the same file serves the GPU machine's Python, whatever its version.
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$WHEELS" 'ml_collections==1.1.0'
    ls -l "$WHEELS"
    ;;
  run)
    shift
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
      "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl
    fi
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    out=${OUT:-workdirs/bench}
    mkdir -p "$out"
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    fi
    "$PY" - <<'EOF'
import importlib.metadata as m
import jax
def version(name):
  try:
    return m.version(name)
  except m.PackageNotFoundError:
    return 'missing'
print('devices:', jax.devices())
print(', '.join(f'{p} {version(p)}' for p in
                ('jax', 'jaxlib', 'flax', 'optax', 'ml_collections', 'torch', 'transformers', 'peft')))
EOF
    if (($#)); then
      args=("$@")
    else
      # A child that hangs fails alone, with its log in $out, and leaves time for a rerun.
      args=(--workloads=llama-lora --llama-size=1b --dtypes=bfloat16 --child-timeout=300)
    fi
    "$PY" scripts/bench/speed.py "${args[@]}" --out="$out/speed_gpu.json"
    ;;
  *)
    sed -n '2,14p' "$0" >&2
    exit 2
    ;;
esac
