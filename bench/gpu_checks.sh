#!/usr/bin/env bash
# Everything a session with a lent CUDA GPU checks, in one script, each part within its time
# limit on an H200:
#   run: bash bench/gpu_checks.sh [PART ...]    (carry: .whl, the wheels the GPU image lacks)
# Parts (default: all but stepprof, in this order), each cut at its time limit so the script
# always ends:
#   tests  200 s  the CUDA tests: data-free merges and the DAM engine on the GPU against the CPU,
#                 bf16 training, the fused KL gradient, the compiled merge kernels against the
#                 eager ones and the definition, batched teachers, a DAM training with compiled
#                 kernels, layer streaming against resident stores, torchrun ranks over nccl
#                 against one process (145 s on 2026-12-04)
#   offload 120 s bench/dam_memory.py --gpu: 3 x ~1B bf16, 2,048 tokens, offload none | layers
#                 with and without checkpointing: step time, max_memory_allocated against the plan
#   merge   80 s  bench/merge_speed.py, TIES with the merge on the GPU (the I/O-bound ratio)
#   profile 45 s  bench/merge_profile.py: the same merge once under torch.profiler, on the
#                 inputs the merge part made (stages of the loop, operators, pinned allocator)
#   small  240 s  bench/dam_step.py --gpu --shape small: hidden 2048, 512 tokens, bf16;
#                 kernels compiled (the passes) and layers (decoder layers compiled whole),
#                 N = 2, 3, 5, teachers on the fly and precomputed, plain step and reference
#                 (eager kernels: measured 2026-12-04, see docs/benchmarks.md)
#   7b     240 s  bench/dam_step.py --gpu --shape 7b: Mistral-7B layer widths, 2,048 tokens,
#                 bf16, $DAM_7B_LAYERS decoder layers (default 8: making and reading the
#                 random checkpoints of more layers does not fit the ten minutes); compiled vs
#                 layers, N = 2, 3, 5, on the fly and precomputed, plain step
#   stepprof 75 s (on request) bench/dam_profile.py --gpu --shape small --kernels layers --n 5:
#                 where the small shape's DAM step spends device and host time, on the models
#                 the small part made
#   then   10 s  bench/targets.py: every target of the parts that ran, PASS or FAIL
# The default parts' limits add up to 925 s, plus ~15 s of setup per call: more than one call's
# ten minutes, so a fifteen-minute lease runs two calls back to back, the second within the
# machine's warm half-minute: `bash bench/gpu_checks.sh small 7b` first (480 s; the targets
# still open), then `... tests offload merge profile` (445 s) as the lease allows. Parts end
# well inside their limits (a whole lease used ~680 s of command time). The small shape
# compiles the kernels first (bf16, N = 2, 3, 5); the 7b shape finds them in inductor's cache
# (the same graphs: dynamic sizes).
# Results land in $OUT (the device tool's folder) or bench/.work/gpu; the random models in
# /dev/shm when it has room (faster to write and read than the disk), else bench/.work/dam_step.
set -uo pipefail
OUT=${OUT:-bench/.work/gpu}
DAM_7B_LAYERS=${DAM_7B_LAYERS:-8}
PARTS=${*:-tests offload merge profile small 7b}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
WORK=bench/.work/dam_step
shm=$(df -B1 --output=avail /dev/shm 2>/dev/null | tail -1)
if [ "${shm:-0}" -gt $((48 * 2 ** 30)) ] 2>/dev/null; then WORK=/dev/shm/dammerge-bench; fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, transformers, pydantic, triton; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'triton', triton.__version__, 'cuda', \
torch.cuda.is_available())"
echo "parts: $PARTS; models in $WORK"
wants() { [[ " $PARTS " == *" $1 "* ]]; }
results=()

if wants tests; then
    echo "== tests: CUDA tests"
    timeout 200 python3 -m pytest -q -p no:cacheprovider -k "cuda or reading_ahead" \
        tests/learned/test_cuda.py tests/learned/test_distributed_cli.py tests/test_merge_e2e.py \
        2>&1 | tail -40 | tee "$OUT/pytest.log"
fi

if wants offload; then
    echo "== offload: DAM on 3 x ~1B bf16, streamed against resident stores, against the plan"
    timeout 120 python3 bench/dam_memory.py --gpu --work "$WORK" \
        --output "$OUT/dam_memory_gpu.json" 2>&1 | tee "$OUT/dam_memory_gpu.log"
    results+=("$OUT/dam_memory_gpu.json")
fi

if wants merge; then
    echo "== merge: merge speed, TIES on the GPU"
    timeout 80 python3 bench/merge_speed.py --device cuda --ours-only --repeats 2 \
        --output "$OUT/merge_speed_cuda.json" 2>&1 | grep -v -E "it/s|shard/s" | tee "$OUT/merge.log"
    results+=("$OUT/merge_speed_cuda.json")
fi

if wants profile; then
    echo "== profile: the GPU merge under torch.profiler"
    timeout 45 python3 bench/merge_profile.py --device cuda \
        --output "$OUT/merge_profile_cuda.txt" 2>&1 | tee "$OUT/merge_profile.log"
fi

dam_step() {  # dam_step SHAPE OUTPUT LIMIT [ARGS...]
    local shape=$1 output=$2 limit=$3
    shift 3
    timeout "$limit" python3 bench/dam_step.py --gpu --shape "$shape" --kernels compiled,layers \
        --work "$WORK" --output "$OUT/$output.json" "$@" 2>&1 \
        | grep -v -E "round/s|variant/s|it/s" | tee "$OUT/$output.log"
    results+=("$OUT/$output.json")
}

if wants small; then
    echo "== small: DAM step, hidden 2048, 512 tokens, bf16, compiled passes vs compiled layers"
    dam_step small dam_step_gpu 240
fi

if wants stepprof; then
    echo "== stepprof: the small shape's DAM step under torch.profiler, N = 5, compiled layers"
    timeout 75 python3 bench/dam_profile.py --gpu --shape small --kernels layers --n 5 \
        --steps 2 --rows 30 --work "$WORK" --output "$OUT/dam_profile_gpu_small.txt" 2>&1 \
        | grep -v -E "it/s" | tail -5 | tee "$OUT/dam_profile.log"
fi

if wants 7b; then
    echo "== 7b: DAM step, Mistral-7B widths, $DAM_7B_LAYERS layers, 2,048 tokens, bf16"
    dam_step 7b dam_step_gpu_7b 240 --layers "$DAM_7B_LAYERS"
fi

if [ ${#results[@]} -gt 0 ]; then
    echo "== targets"
    timeout 10 python3 bench/targets.py "${results[@]}" | tee "$OUT/targets.txt"
fi
