#!/usr/bin/env bash
# Create ./.venv (once) and install the package into it, editable, with the given extras.
# Re-installs only when pyproject.toml changes. Usage: scripts/bootstrap.sh [extras]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
fi
stamp=".venv/.minicpm4-installed-${extras:-base}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    spec="."
    [ -n "$extras" ] && spec=".[${extras}]"
    .venv/bin/python -m pip install --quiet -e "$spec"
    echo "$want" > "$stamp"
fi
