#!/usr/bin/env bash
# One command for the real federated run (POC + MLflow + submit + results); options: --help.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
exec .venv/bin/python -m spleen_tools.cli.run_experiment "$@"
