#!/usr/bin/env bash
# The project's test command: prepare the environment (fast when already done), then run pytest.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -m "not host"` or
# `bash tools/test.sh tests/test_host_smoke.py`; without a path pytest runs tests/ (testpaths).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup.sh
exec .venv/bin/python -m pytest -q "$@"
