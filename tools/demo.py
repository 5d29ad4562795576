"""The main job: a video from the bundled model, through a real ComfyUI and its /prompt API.

    .venv/bin/python tools/demo.py "a red circle moving right on a blue background" [--seed 1] [--out output]

Starts the headless ComfyUI host with this pack, queues `workflows/api/lavie_full_cascade.json` with the
prompt, waits for it, and writes `<out>/<name>.mp4` plus `<out>/<name>_sheet.png` (a contact sheet).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from comfy_host import ComfyServer  # noqa: E402

WORKFLOW = ROOT / "workflows" / "api" / "lavie_full_cascade.json"
SAMPLERS = ("LaVieSampler", "LaVieInterpolate", "LaVieUpscale")


def set_prompt(graph: dict, prompt: str, seed: int | None, steps: int | None) -> dict:
    """Put `prompt` into every text node that feeds a sampler's `positive` input."""
    for node in graph.values():
        if node["class_type"] not in SAMPLERS:
            continue
        source = graph[node["inputs"]["positive"][0]]
        source["inputs"]["text"] = prompt
        if seed is not None:
            node["inputs"]["seed"] = seed
        if steps is not None:
            node["inputs"]["steps"] = steps
    return graph


def contact_sheet(video: Path, out: Path, columns: int = 8, rows: int = 2) -> tuple[int, int, int]:
    """Evenly spaced frames of `video` in a grid; returns (frames, height, width) of the video."""
    import cv2
    import numpy as np

    cap = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    if not frames:
        raise RuntimeError(f"{video}: no frames could be read")
    h, w = frames[0].shape[:2]
    picks = np.linspace(0, len(frames) - 1, min(columns * rows, len(frames))).round().astype(int)
    tiles = [frames[i] for i in picks]
    tiles += [np.zeros_like(frames[0])] * (columns * rows - len(tiles))
    grid = np.concatenate([np.concatenate(tiles[r * columns:(r + 1) * columns], axis=1) for r in range(rows)], axis=0)
    cv2.imwrite(str(out), grid)
    return len(frames), h, w


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prompt", nargs="?", default="a red circle moving right on a blue background")
    parser.add_argument("--seed", type=int, default=None, help="seed of every stage (default: the workflow's)")
    parser.add_argument(
        "--steps", type=int, default=20,
        help="sampling steps of every stage (the workflow keeps the official 50; 20 keeps a CPU run short)",
    )
    parser.add_argument("--out", default=str(ROOT / "output"), help="folder for the mp4 and the contact sheet")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    graph = set_prompt(json.loads(WORKFLOW.read_text()), args.prompt, args.seed, args.steps)
    name = re.sub(r"[^a-z0-9]+", "_", args.prompt.lower()).strip("_")[:60] or "lavie"
    started = time.time()
    with ComfyServer(work_dir=out / "comfyui-run") as server:
        print(f"ComfyUI is up at {server.url}; queueing {WORKFLOW.relative_to(ROOT)}", flush=True)
        prompt_id = server.queue(graph)
        server.wait(prompt_id, timeout=args.timeout)
        videos = [p for p in server.output_files(prompt_id) if p.suffix in (".mp4", ".webm")]
    if not videos:
        print("error: the workflow finished but saved no video", file=sys.stderr)
        return 1
    video = out / f"{name}{videos[0].suffix}"
    shutil.copyfile(videos[0], video)
    sheet = out / f"{name}_sheet.png"
    frames, h, w = contact_sheet(video, sheet)
    print(f"{video}: {frames} frames at {w}x{h}, made in {time.time() - started:.0f} s")
    print(f"{sheet}: contact sheet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
