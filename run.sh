#!/usr/bin/env bash
# The main job: generate with the bundled default model (no downloads, no hub).
# With no arguments it continues an Austen opening; any arguments go to `minicpm4 generate`,
# e.g. ./run.sh --prompt "Once upon a time" --max-tokens 64 --temperature 0.8
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh
if [ "$#" -eq 0 ]; then
    set -- --prompt "It is a truth universally acknowledged, that a single man" \
        --max-tokens 80 --temperature 0.8 --top-p 0.95 --repetition-penalty 1.1 --seed 0
fi
exec .venv/bin/minicpm4 generate "$@"
