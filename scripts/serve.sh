#!/usr/bin/env bash
# Sets up (if needed) and runs the whole service under supervisord on $PORT (5000).
# MOONDREAM_MODEL defaults to the hub's vikhyatk/moondream2; for the offline demo
# use MOONDREAM_MODEL=tests/conformance/main (tiny random-weight test model).
# Exits 1 at once when the service cannot start here (already running with this RUN_DIR, a port
# taken), and when a program stays down before the service is ready (ready_notice names it).
set -euo pipefail
cd "$(dirname "$0")/.."
export RUN_DIR=${RUN_DIR:-$PWD/run}
# Before anything is touched (setup, the metrics directory): one line and exit 1 if we cannot start.
if [ -x .venv/bin/python ]; then .venv/bin/python -m shared.preflight; fi
# SKIP_SETUP=1: .venv is known to be ready (offline, or the tests): do not check it with pip.
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
.venv/bin/python -m shared.preflight
# FRONTEND_WORKERS and PREPROCESS_WORKERS as set, or sized from the usable CPUs (supervisord needs numbers)
# A setting that cannot work (PORT=abc, HOST=0.0.0.0 without VLM_API_KEY) stops here: one line, exit 78.
sizes=$(.venv/bin/python -m shared.sizes)
eval "$sizes"
mkdir -p -m 700 "$RUN_DIR"  # logs and the control socket: the owner's only
.venv/bin/python -m shared.model_family "$RUN_DIR/gpu_workers"  # a GPU worker program per extra MOONDREAM_MODELS entry
rm -rf "$RUN_DIR/frontend-metrics"  # the front ends' counts (supervisord.conf) start from zero with the service
rm -f "$RUN_DIR/not-started"  # ready_notice writes it when a program stays down before the service is ready
# The terminal then shows one line once the service is ready (supervisord.conf, ready_notice);
# if a program stays down first, ready_notice names it and stops the service (STOP_WHEN_DOWN).
export STOP_WHEN_DOWN=${STOP_WHEN_DOWN:-1}
# As root, say so on purpose: supervisord otherwise logs a CRIT line about not dropping privileges.
as_root=()
[ "$(id -u)" = 0 ] && as_root=(--user=root)
# Not exec: the exit status says whether the service started.  supervisord handles INT/TERM/HUP
# itself (Ctrl-C reaches it directly); a signal sent to this script is passed on.
.venv/bin/supervisord -n -c supervisord.conf "${as_root[@]}" &
supervisord_pid=$!
trap 'kill -TERM "$supervisord_pid" 2>/dev/null || true' TERM INT HUP
status=0
while kill -0 "$supervisord_pid" 2>/dev/null; do
  wait "$supervisord_pid" || status=$?
done
[ -e "$RUN_DIR/not-started" ] && exit 1
exit "$status"
