#!/usr/bin/env bash
# Create or update .venv with the pinned set: requirements.txt within the tested constraints.txt (idempotent:
# skips pip when neither changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"' \
  || { echo "error: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 2; }
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  log=.venv/pip-install.log
  echo "installing requirements.txt into .venv (a few minutes the first time; log: $log)"
  { .venv/bin/python -m pip install --upgrade pip \
      && .venv/bin/python -m pip install -r requirements.txt -c constraints.txt \
      && .venv/bin/python -m pip install --no-deps -e .; } > "$log" 2>&1 \
    || { tail -n 20 "$log" >&2; echo "error: pip install failed (full log: $log)" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
