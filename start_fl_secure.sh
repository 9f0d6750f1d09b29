#!/usr/bin/env bash
# Start the provisioned secure (TLS) server and N sites; also: provision, --status, --stop. Options: --help.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
exec .venv/bin/python -m spleen_tools.cli.secure_system "$@"
