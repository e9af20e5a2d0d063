#!/usr/bin/env bash
# The whole GPU check in one device call on 2xH200 (repo root, $OUT set by the device tool):
#   bash tools/gpu_suite.sh
# 1. GPU topology; 2. every @pytest.mark.gpu test; 3. MoE-layer forward latency
# (tools/bench_moe.py) for the Mixtral and Qwen3 layer shapes, tokens 1..4096 per rank,
# at world 1 and 2 over NVLink and again with NCCL_P2P_DISABLE=1 (our PCIe stand-in;
# ep_nvshmem is skipped there and at world 1, where it cannot or need not run); with 4 or
# more GPUs also at world 4, as EP 4 and as EP 2 x 2 (--group-size 2; about 3.5 min more).
# Files under $OUT (4): gpu_tests.log, bench_moe.log, bench_moe.json, bench_moe.png.
# Prints failures with their log tails, then the compact latency table last.
# Budget: under 9 minutes; every step has its own time limit.
set -uo pipefail

OUT=${OUT:?set OUT to the output folder}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if [ -f .devtools/device_env.sh ]; then
  # shellcheck disable=SC1091
  source .devtools/device_env.sh
fi
# Must stay set on this machine (NVLink multicast can take the shared host's GPUs down).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Room for the dispatcher's symmetric buffers (Qwen3 at 4096 tokens/rank: ~0.5 GiB).
export NVSHMEM_SYMMETRIC_SIZE=${NVSHMEM_SYMMETRIC_SIZE:-4G}

PY=python3
START=$SECONDS
FAILED=()
BENCH_JSON="$OUT/bench_moe.json"
BENCH_LOG="$OUT/bench_moe.log"
: >"$BENCH_LOG"
rm -f "$BENCH_JSON"

step() { echo; echo "=== [$((SECONDS - START))s] $*"; }

step "GPUs and topology"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
nvidia-smi topo -m
$PY - <<'EOF'
import torch
import torch.distributed._symmetric_memory as symm_mem
try:
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
except (AttributeError, RuntimeError) as err:
    nccl = f"unknown ({err})"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {nccl}, "
      f"{torch.cuda.device_count()} GPUs, NVSHMEM available: {symm_mem.is_nvshmem_available()}")
print("P2P 0<->1:", torch.cuda.can_device_access_peer(0, 1) if torch.cuda.device_count() > 1 else "-")
EOF

if [ "${SUITE_TESTS:-1}" = 1 ]; then  # SUITE_TESTS=0: benchmarks only
  step "GPU tests: pytest -m gpu (log: gpu_tests.log)"
  # The NVSHMEM tests first (a hang elsewhere must not hide them), then every other gpu test.
  timeout -k 10 300 $PY -m pytest -m gpu -q -p no:cacheprovider --durations=8 \
    tests/multirank/test_nvshmem_dispatch.py tests >"$OUT/gpu_tests.log" 2>&1
  rc=$?
  tail -n 12 "$OUT/gpu_tests.log"
  if [ $rc -ne 0 ]; then
    FAILED+=("pytest -m gpu (rc=$rc$([ $rc -eq 124 ] && echo ', timed out after 300 s'))")
  fi
fi

bench() {  # [BENCH_GROUP=G] bench <label> <seconds> <nproc> <strategies> [env assignments...]
  local label=$1 limit=$2 nproc=$3 strategies=$4
  shift 4
  step "bench_moe: $label"
  echo "=== $label" >>"$BENCH_LOG"
  local first_line=$(($(wc -l <"$BENCH_LOG") + 1))
  env "$@" timeout -k 10 "$limit" $PY -m torch.distributed.run --standalone \
    --nproc-per-node "$nproc" tools/bench_moe.py --shape mixtral,qwen3 \
    --tokens 1,16,64,256,4096 --strategies "$strategies" --dtype bf16 --uniform-routing \
    --warmup 10 --iters 30 --timeout-s 60 ${BENCH_GROUP:+--group-size "$BENCH_GROUP"} \
    --json "$BENCH_JSON" >>"$BENCH_LOG" 2>&1
  local rc=$?
  tail -n +"$first_line" "$BENCH_LOG" | grep -E "failed|Error|error:" | tail -n 3 || true
  if [ $rc -ne 0 ]; then
    FAILED+=("bench $label (rc=$rc$([ $rc -eq 124 ] && echo ", timed out after $limit s"))")
  fi
}

bench "world 1" 70 1 replicate,tp_experts,ep_allgather,ep_nccl
bench "world 2, NVLink" 120 2 replicate,tp_experts,ep_allgather,ep_nccl,ep_nvshmem
bench "world 2, NCCL_P2P_DISABLE=1 (PCIe stand-in)" 100 2 \
  replicate,tp_experts,ep_allgather,ep_nccl NCCL_P2P_DISABLE=1
if [ "$(nvidia-smi -L | wc -l)" -ge 4 ]; then
  bench "world 4, NVLink" 150 4 replicate,tp_experts,ep_allgather,ep_nccl,ep_nvshmem
  bench "world 4, NCCL_P2P_DISABLE=1" 130 4 replicate,tp_experts,ep_allgather,ep_nccl \
    NCCL_P2P_DISABLE=1
  # torch's NVSHMEM all-to-all needs EP = world: no ep_nvshmem at EP 2 x 2
  BENCH_GROUP=2 bench "world 4 as EP 2 x 2, NVLink" 120 4 tp_experts,ep_allgather,ep_nccl
  BENCH_GROUP=2 bench "world 4 as EP 2 x 2, NCCL_P2P_DISABLE=1" 110 4 \
    tp_experts,ep_allgather,ep_nccl NCCL_P2P_DISABLE=1
fi

step "done in $((SECONDS - START)) s"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED STEPS: ${FAILED[*]}"
  echo "--- gpu_tests.log (failures, last 60 lines)"
  grep -nE "^(FAILED|ERROR)|Error|error" "$OUT/gpu_tests.log" | tail -n 20
  tail -n 60 "$OUT/gpu_tests.log"
  echo "--- bench_moe.log (tracebacks, last 40 lines)"
  grep -nE "Traceback|Error|failed" "$BENCH_LOG" | tail -n 20
  tail -n 40 "$BENCH_LOG"
else
  echo "all steps passed"
fi
echo
if [ -f "$BENCH_JSON" ]; then
  $PY tools/bench_moe.py --report "$BENCH_JSON" --compact --png "$OUT/bench_moe.png"
else
  echo "no benchmark results ($BENCH_JSON missing)"
fi
[ ${#FAILED[@]} -eq 0 ]
