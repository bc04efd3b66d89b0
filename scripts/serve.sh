#!/usr/bin/env bash
# Sets up (if needed) and runs the whole service under supervisord on $PORT (5000).
# MOONDREAM_MODEL defaults to the hub's vikhyatk/moondream2; for the offline demo
# use MOONDREAM_MODEL=tests/conformance/main (tiny random-weight test model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RUN_DIR=${RUN_DIR:-$PWD/run}
# FRONTEND_WORKERS and PREPROCESS_WORKERS as set, or sized from the usable CPUs (supervisord needs numbers)
eval "$(.venv/bin/python -m shared.host_size)"
mkdir -p -m 700 "$RUN_DIR"  # logs and the control socket: the owner's only
.venv/bin/python -m shared.model_family "$RUN_DIR/gpu_workers"  # a GPU worker program per extra MOONDREAM_MODELS entry
rm -rf "$RUN_DIR/frontend-metrics"  # the front ends' counts (supervisord.conf) start from zero with the service
# The terminal then shows one line once the service is ready (supervisord.conf, ready_notice).
# As root, say so on purpose: supervisord otherwise logs a CRIT line about not dropping privileges.
as_root=()
[ "$(id -u)" = 0 ] && as_root=(--user=root)
exec .venv/bin/supervisord -n -c supervisord.conf "${as_root[@]}"
