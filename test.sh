#!/usr/bin/env bash
# Run the test suite (default tier; `./test.sh -m slow` for the slow tier). Args go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh dev
exec .venv/bin/python -m pytest "$@"
