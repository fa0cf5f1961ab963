#!/usr/bin/env bash
# Issue 9's GPU measurements in one call on a lent GPU machine, about 8 minutes in all.
#
#   bash bench/gpu.sh fetch   here, once: the project's pinned transformers and peft wheels
#                             into .whl/ (the GPU machine has other versions and no network)
#   bash bench/gpu.sh         there, from the repository root, with .whl carried along:
#                             run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600)
#   bash bench/gpu.sh dry-run here: the same parts on the CPU on a micro model, in seconds
#   bash bench/gpu.sh kernels there, about 5 minutes: the paged attention kernel's tests on
#                             CUDA, then the decode step with each attention kernel
#                             (--attention-kernel gather / paged) on both geometries
#   bash bench/gpu.sh scheduler there, about 6 minutes: the step budget on the GPU (batch
#                             arrival against transformers, the stall probe, mixed lengths) on
#                             Llama-3.2-1B's geometry; `scheduler-dry-run` runs it here on a
#                             micro model
#
# Every part runs in its own process under its own time limit, and a part that fails or runs
# out of time costs only its own figures (each part writes them as it goes). Everything lands
# in $OUT (or gpu-bench/ where OUT is unset): gpu_bench.md (sections to paste into
# docs/benchmarks.md), results.json, profile_decode_step.txt and gpu_run.log.
set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = fetch ]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d .whl transformers==5.23.0 peft==0.21.2
    exit
fi

out="${OUT:-gpu-bench}"
mkdir -p "$out"
log="$out/gpu_run.log"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${1:-}" != *dry-run ]] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

# part NAME SECONDS COMMAND...: run one part under its limit; say how it ended.
part() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit} s)" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    local verdict="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="stopped at its limit"
    elif [ $rc -ne 0 ]; then verdict="failed (exit $rc)"; fi
    echo "=== $name: $verdict after $((SECONDS - start)) s" | tee -a "$log"
}

python=python3
[ -x .venv/bin/python ] && [[ "${1:-}" == *dry-run ]] && python=.venv/bin/python
mode=${1:-all}
if [[ "$mode" == *dry-run ]]; then
    bench=("$python" bench/gpu_decode.py --device cpu --dry-run --out "$out")
    test_device=cpu
else
    bench=("$python" bench/gpu_decode.py --device cuda --out "$out")
    test_device=cuda
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$log"
fi
"$python" -c "import torch, transformers, peft; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1 | tee -a "$log"
if [ "$mode" = scheduler ] || [ "$mode" = scheduler-dry-run ]; then
    # The step cost is measured on the device at each engine's start; these are the CPU's
    # scheduler benchmarks (docs/benchmarks.md) on the GPU.
    device=cuda model=llama-1b-geometry dtype=bfloat16 rows=1,8,16 prompt=512 long=1900
    if [ "$mode" = scheduler-dry-run ]; then
        device=cpu model=micro dtype=float32 rows=1,2 prompt=64 long=300
    fi
    md="$out/gpu_bench.md"
    part batch_arrival 240 "$python" bench/batch_arrival.py --device $device --model $model \
        --dtype $dtype --rows $rows --prompt $prompt --write "$md"
    part stall_probe 150 "$python" bench/chunked_prefill.py --device $device --model $model \
        --targets 2.8 --budgets 8192 --long-prompt $long --write "$md"
    part mixed_lengths 60 "$python" bench/mixed_lengths.py --device $device --model $model \
        --long-context $long --write "$md"
    grep -h "^=== .*after" "$log"
    cat "$md"
    exit
fi
if [ "$mode" = kernels ]; then
    # The compiled FlexAttention kernel equals the CPU reference, and the paged engine's static
    # decode (eager and replayed from CUDA graphs) gives the gather path's and PEFT's tokens.
    part tests 240 env PREFIX_SERVER_TEST_DEVICE=$test_device "$python" -m pytest -q \
        -p no:cacheprovider tests/unit/test_paged_attention.py \
        tests/integration/test_static_decode.py -k "paged or compiled"
    part env 20 "${bench[@]}" --part env
    part kernels 300 "${bench[@]}" --part kernels
    grep -h "^=== .*after" "$log"
    cat "$out/gpu_bench.md"
    exit
fi
# Correctness first: the static decode path replayed from CUDA graphs gives the eager path's
# and PEFT's tokens on tiny models (the exactness tests proper run on the CPU). The paged
# attention kernel's own run: `bash bench/gpu.sh kernels`.
part tests 60 env PREFIX_SERVER_TEST_DEVICE=$test_device "$python" -m pytest -q \
    -p no:cacheprovider tests/integration/test_static_decode.py -k "not paged"
part env 20 "${bench[@]}" --part env
part engine 150 "${bench[@]}" --part engine
part transformers 150 "${bench[@]}" --part transformers
part peft 50 "${bench[@]}" --part peft
part load 45 "${bench[@]}" --part load
part summary 15 "${bench[@]}" --part summary
grep -h "^=== .*after" "$log"
cat "$out/gpu_bench.md"
