#!/usr/bin/env bash
# Everything a session with a lent CUDA GPU checks, in one call of the device tool:
#   run: bash bench/gpu_checks.sh      (carry: .whl, the wheels the GPU image lacks)
# 1. the CUDA tests (skipped everywhere else): data-free merges and the DAM engine on the GPU
#    against the CPU, bf16 training, the fused KL gradient;
# 2. bench/merge_speed.py with the merge on the GPU (no mergekit there: the I/O-bound ratio);
# 3. bench/dam_step.py --gpu: a DAM step at a realistic width, bf16, 512 tokens.
# Results land in $OUT (the device tool's folder) or bench/.work/gpu.
set -uo pipefail
OUT=${OUT:-bench/.work/gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, transformers, pydantic, datasets; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

echo "== 1. CUDA tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider -k "cuda or reading_ahead" \
    tests/learned/test_cuda.py tests/test_merge_e2e.py 2>&1 | tail -25 | tee "$OUT/pytest.log"

echo "== 2. merge speed, TIES on the GPU"
timeout 150 python3 bench/merge_speed.py --device cuda --ours-only --repeats 3 \
    --output "$OUT/merge_speed_cuda.json" 2>&1 | grep -v -E "it/s|shard/s" | tee "$OUT/merge.log"
recipe=bench/.work/merge_speed-full/recipe.yml
timeout 40 python3 -m cProfile -s cumtime -m dammerge.cli merge "$recipe" /tmp/profiled --device cuda \
    --overwrite 2>&1 | grep -v -E "it/s" | head -45 > "$OUT/merge_profile.txt"

echo "== 3. DAM step, bf16 on the GPU"
timeout 270 python3 bench/dam_step.py --gpu --output "$OUT/dam_step_gpu.json" 2>&1 \
    | grep -v -E "round/s|variant/s" | tee "$OUT/dam_step.log"
