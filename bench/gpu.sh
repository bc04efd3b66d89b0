#!/usr/bin/env bash
# The engine benchmarks on one lent GPU (H100 / H200), in one go, in under 12 minutes.
#
#   bash bench/gpu.sh            # from the repo root or anywhere
#
# Installs nothing: it uses the machine's own python3 (which holds PyTorch with
# CUDA, numpy, tokenizers, safetensors), not the repo's .venv, and full-size
# random weights (random:full), so it needs no checkpoint and no network.
# Results (markdown tables, JSON, the GPU's identity) go to $OUT when it is set,
# else to /tmp/moondream-bench; docs/performance.md says where they belong.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-/tmp/moondream-bench}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
} 2>&1 | tee "$RESULTS/gpu.txt"

# Each part has its own time limit so one slow part cannot eat the other's time.
# engine.py: load ~10 s, peaks ~5 s, encodes 2/5/10/13 crops and decode 1/8/32/64: ~1 min
# --profile: one profiled decode step at batch 1 and 64: kernel time vs wall time
timeout 150 $PY bench/engine.py --device cuda --dtype bfloat16 --profile "$RESULTS/decode_profile.txt" \
  --json "$RESULTS/engine_cuda.json" 2>&1 | tee "$RESULTS/engine_cuda.md" || status=1

# throughput.py: 2 workloads x 4 concurrencies, each point capped at 15 s after warm-up
# (--budget: points not started after 170 s are skipped, so the table prints before the timeout)
timeout 200 $PY bench/throughput.py --device cuda --dtype bfloat16 --seconds 15 --budget 170 \
  --json "$RESULTS/throughput_cuda.json" 2>&1 | tee "$RESULTS/throughput_cuda.md" || status=1

# Moondream 3 (random:md3-full, bf16, 18.5 GB of weights): encodes and decode 1/8/32/64, ~2 min.
# Its floors count every expert's bytes (right at batch 32+, where nearly all 64 are routed to;
# at batch 1 a step reads 8 of 64, so the memory floor there is ~4x too high).
timeout 180 $PY bench/engine.py --model random:md3-full --device cuda --dtype bfloat16 \
  --json "$RESULTS/engine_cuda_md3.json" 2>&1 | tee "$RESULTS/engine_cuda_md3.md" || status=1

# overhead.py: random:overhead (24 layers, tiny widths) steady decode steps at batch 1 and 64, eager and
# COMPILE=on (CUDA graphs): the host time per step a GPU waits on, against batch 1's 0.93 ms memory floor
timeout 150 $PY bench/overhead.py --device cuda --baseline none --compile --batches 1 64 --steps 30 --rounds 1 \
  --json "$RESULTS/overhead_cuda.json" 2>&1 | tee "$RESULTS/overhead_cuda.md" || status=1

echo "results in $RESULTS"
exit $status
