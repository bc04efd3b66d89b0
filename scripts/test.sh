#!/usr/bin/env bash
# Sets up (if needed) and runs the test suite.  The web-page test needs Debian's
# chromium + chromium-driver; they are installed when apt-get is usable.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
    || echo "note: could not install chromium; the web-page test will be skipped"
fi
# Two processes, each taking whole test files (module fixtures such as a running stack stay
# shared within a file); TEST_PROCESSES=0 runs everything in this one process.
exec .venv/bin/python -m pytest -n "${TEST_PROCESSES:-2}" --dist loadfile "$@"
