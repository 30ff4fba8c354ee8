#!/usr/bin/env bash
# README command 2: the test suite (sets up .venv on first use).
source "$(dirname "$0")/env.sh"
cd "$ROOT"
ruff check .
python -m pytest "$@"
