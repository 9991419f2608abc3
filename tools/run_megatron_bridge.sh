#!/usr/bin/env bash
# Megatron-Bridge through the conformance suite on a GPU machine (how docs/reports/megatron_bridge_* were made).
#
#   OUT=/some/dir [NPROC=2] [STRICT=1] bash tools/run_megatron_bridge.sh [profile] [seconds] [extra conformance args]
#
# NPROC ranks, one GPU each (world NPROC); reports are named megatron_bridge_world$NPROC.*. STRICT=0 drops
# --strict-deviations (the shipped file declares world-2 deviations, some of which pass at world 1).
# Needs wheels of megatron-core and megatron-bridge in .whl/ (see docs/backends.md); they are installed
# --no-deps into a scratch directory, so nothing else on the machine changes.
set -uo pipefail
profile=${1:-thorough}
limit=${2:-420}
nproc=${NPROC:-2}
strict=$([ "${STRICT:-1}" = 1 ] && echo --strict-deviations)
out=${OUT:-.}
site=${SITE:-/tmp/megatron-site}
name="$out/megatron_bridge_world$nproc"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
export PYTHONPATH="$site:$PWD" NCCL_NVLS_ENABLE=0
# The watchdog and the collective timeout end a stuck run; `timeout` is the last resort.
timeout --kill-after 10 "$limit" torchrun --standalone --nproc-per-node "$nproc" -m conformance \
    --backend conformance.backends.megatron_bridge:MegatronBridgeBackend \
    --deviations megatron_bridge $strict --profile "$profile" --timeout 60 \
    --report-json "$name.json" --report-md "$name.md" \
    "${@:3}" 2>&1 | grep -v "OMP_NUM_THREADS\|^W1\|\*\*\*\*" | tee "$name.txt"
