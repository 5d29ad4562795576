#!/usr/bin/env bash
# The main job on a fresh machine: set up (fast when already done), then make a video from the bundled
# model through a real ComfyUI. Arguments go to tools/demo.py (prompt, --seed, --steps, --out).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup.sh
exec .venv/bin/python tools/demo.py "$@"
