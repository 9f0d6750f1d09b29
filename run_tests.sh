#!/usr/bin/env bash
# The test command: sets up .venv, then runs pytest (all tests; pass -m "not slow" for the fast ones).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
