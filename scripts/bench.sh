#!/usr/bin/env bash
# Run a benchmark script by name (sets up .venv on first use): bash scripts/bench.sh fp8_convert [args]
source "$(dirname "$0")/env.sh"
name="$1"; shift
python "$ROOT/benchmarks/$name.py" "$@"
