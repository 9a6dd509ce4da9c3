#!/usr/bin/env bash
# The main job: generate with the bundled default model (no downloads). Extra args go to
# `minicpm4 generate`, e.g. ./run.sh --prompt "Once upon a time" --max-tokens 64
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh
exec .venv/bin/minicpm4 generate "$@"
