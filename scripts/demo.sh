#!/usr/bin/env bash
# The main job: python -m qlib demo, in .venv/ (made on first use).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$PY" -m qlib demo "$@"
