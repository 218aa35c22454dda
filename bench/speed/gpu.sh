#!/usr/bin/env bash
# The speed benchmark on a GPU machine: tadrop --device cuda against mergekit --cuda, one script
# for a short lease. Such a machine has python3 with a CUDA torch but may have no network: the
# packages it lacks (pydantic for tadrop; mergekit, immutables and pydantic for mergekit) come as
# wheels in .whl/ (see bench/speed/README.md). Writes its report and logs under $OUT.
#
#   OUT=/tmp/gpu-out bash bench/speed/gpu.sh            # sizes, methods: SIZES=168m METHODS=...
#
# On the lent H100 the default run (168m, 3 methods, 3 repeats, with the cross-checks) takes
# ~8 minutes, most of it importing torch (~5 s per process there). The report is rewritten after
# every case, so a run cut short keeps what it measured.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, tadrop_cli; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1

# 1. the CPU kernels, so that the GPU's results are compared with theirs (tadrop without them
#    where this machine cannot build them: no compiler, or no setuptools)
timeout 120 python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1
python3 -c "from tadrop_cli import kernels; print('CPU kernels:', 'built' if kernels.available() else 'not built')"

# 2. the tests that need a GPU (skipped elsewhere), the slicing tests and the kernels' tests on this torch
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_slicing.py tests/test_golden_hosts.py tests/test_kernels.py \
    -k "cuda or slices or stream or kernel or merge_slice or histogram" >"$OUT/tests.log" 2>&1
echo "tests: exit $? ($(tail -1 "$OUT/tests.log"))"

# 3. the benchmark: both tools on the GPU, tools alternating, medians (CHECKS="--no-check" skips
#    the cross-checks of the outputs)
timeout "${BENCH_TIMEOUT:-540}" python3 bench/speed/run.py --device cuda --sizes "${SIZES:-168m}" --n-models "${NMODELS:-4}" \
    --methods "${METHODS:-task_arithmetic,ties,dare_ties}" --repeats "${REPEATS:-3}" --wait-idle 0 ${CHECKS:-} \
    --tadrop-cmd "python3 -m tadrop_cli" --mergekit-cmd "python3 -m mergekit.scripts.run_yaml" \
    --out "$OUT/speed-gpu.md" 2>"$OUT/bench.log"
echo "bench: exit $?"
cp bench/.cache/results/speed-*.json "$OUT/" 2>/dev/null
sed -n '/^## Results/,/^## Cross/p' "$OUT/speed-gpu.md" | grep -E "^\| (40m|168m|500m|1b) " | cut -d'|' -f2-13

# 4. the SVD hosts per matrix on the GPU (exact and fast routes side by side, 7B shapes) and the
#    projection of a 7B model's whole time (issue 16's GPU figure; SVD=0 skips it)
if [ "${SVD:-1}" = 1 ]; then
    timeout "${SVD_TIMEOUT:-240}" python3 bench/speed/svd.py --device cuda --shapes 4096x4096,11008x4096,1024x4096 \
        --methods tsv_m,iso_cts --repeats "${SVD_REPEATS:-1}" --project 4096,11008,32,1024 --json "$OUT/svd-gpu.json" >"$OUT/svd-gpu.txt" 2>&1
    echo "svd: exit $?"
    cat "$OUT/svd-gpu.txt"
fi
