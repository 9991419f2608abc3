#!/usr/bin/env bash
# Megatron-Bridge through the conformance suite on a 2-GPU machine (how docs/reports/megatron_bridge_* were made).
#
#   OUT=/some/dir bash tools/run_megatron_bridge.sh [profile] [seconds]
#
# Needs wheels of megatron-core and megatron-bridge in .whl/ (see docs/backends.md); they are installed
# --no-deps into a scratch directory, so nothing else on the machine changes.
set -uo pipefail
profile=${1:-thorough}
limit=${2:-420}
out=${OUT:-.}
site=${SITE:-/tmp/megatron-site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
export PYTHONPATH="$site:$PWD"
# The watchdog and the collective timeout end a stuck run; `timeout` is the last resort.
timeout --kill-after 10 "$limit" torchrun --standalone --nproc-per-node 2 -m conformance \
    --backend conformance.backends.megatron_bridge:MegatronBridgeBackend \
    --deviations conformance/deviations/megatron_bridge.txt --strict-deviations --profile "$profile" --timeout 60 \
    --report-json "$out/megatron_bridge_world2.json" --report-md "$out/megatron_bridge_world2.md" \
    "${@:3}" 2>&1 | grep -v "OMP_NUM_THREADS\|^W1\|\*\*\*\*" | tee "$out/megatron_bridge_world2.txt"
