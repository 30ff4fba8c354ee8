#!/usr/bin/env bash
# README command 1: the main job on the built-in tiny checkpoint (sets up .venv on first use).
source "$(dirname "$0")/env.sh"
dsv3 demo "$@"
