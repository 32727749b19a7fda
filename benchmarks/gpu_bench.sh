#!/usr/bin/env bash
# One prepared GPU run (issue 4, item 5): set up, check correctness, then time SparseLoRA
# against PEFT LoRA in bf16 on the LLaMA-3-8B shape (random weights; timing does not depend
# on the values) with the llama3-8b-math10k and llama3-8b-csr presets, and SmolLM2 end to end.
# Everything it writes goes under $OUT (default runs/gpu): env.txt, nvidia-smi.txt, tests.log,
# and one folder of bench.json / bench.csv / bench.md / bench.png per benchmark.
#
#   bash benchmarks/gpu_bench.sh                      # on a CUDA machine
#   DEVICE=cpu DTYPE=float32 MODEL=DIR STEPS=1 WARMUP=0 SHAPES_MATH=64,16 \
#     SHAPES_CSR=64,3 SKIP_TESTS=1 bash benchmarks/gpu_bench.sh   # dry run (tests do this)
set -euo pipefail

OUT=${OUT:-runs/gpu}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
MODEL=${MODEL:-llama3-8b}          # a flops.py alias (random weights) or a config directory
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
BATCH=${BATCH:-1}
SHAPES_MATH=${SHAPES_MATH:-math}
SHAPES_CSR=${SHAPES_CSR:-commonsense}
SMOLLM2=${SMOLLM2:-1}               # 0 skips the embedded-model run
mkdir -p "$OUT"

if [ ! -x .venv/bin/python ]; then
  make setup
fi
PY=.venv/bin/python
CLI=".venv/bin/sparselora"

{
  "$CLI" env || true
  date -u +"%Y-%m-%dT%H:%M:%SZ"
} > "$OUT/env.txt" 2>&1
if command -v nvidia-smi > /dev/null; then
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
fi

# Correctness first: the sparse blocks against the masked-dense reference and the exact
# savings against the plain model (CPU fp32 tests), then a short sparse step on $DEVICE.
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  "$PY" -m pytest -q tests/engine/test_sparse_equivalence.py tests/engine/test_savings.py > "$OUT/tests.log" 2>&1
fi

bench() {  # name, then bench arguments
  local name=$1
  shift
  "$CLI" bench --model "$MODEL" --random-weights --device "$DEVICE" --dtype "$DTYPE" \
    --batch-size "$BATCH" --warmup "$WARMUP" --steps "$STEPS" --estimator svd \
    --output-dir "$OUT/$name" "$@" 2>&1 | tee "$OUT/$name.log"
}

bench llama3-8b-math10k --preset llama3-8b-math10k --shapes $SHAPES_MATH --padding none left
bench llama3-8b-csr --preset llama3-8b-csr --shapes $SHAPES_CSR --padding none left
if [ "$SMOLLM2" = "1" ]; then
  "$CLI" bench --device "$DEVICE" --dtype "$DTYPE" --batch-size 4 --warmup "$WARMUP" \
    --steps "$STEPS" --shapes $SHAPES_MATH --padding none --output-dir "$OUT/smollm2" \
    2>&1 | tee "$OUT/smollm2.log"
fi
echo "results in $OUT"
