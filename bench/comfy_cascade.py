"""The full cascade as a ComfyUI user runs it: the shipped full-cascade workflow queued through `/prompt` on a
real ComfyUI server with a GPU, at the paper's sizes, with paper-size weights.

    python bench/comfy_cascade.py [--host .hosts/comfyui] [--work DIR] [--steps 50] [--vsr-chunk 8]
                                  [--vsr-overlap 0] [--card-gib GIB] [--seed 0] [--json OUT.json] [--host-args ...]

The released weights cannot be bundled, so the first run writes random ones of the released shapes into
`<work>/models/lavie/` (fp16 safetensors, about 6 GiB; later runs reuse them): the three UNets under their
released names, and two components folders, `random-sd` (a CLIP ViT-L/14 text encoder and the Stable
Diffusion VAE) and `random-x4` (a 1024-wide, 23-layer text encoder and the x4 upscaler's VAE), with the
bundled set's tokenizer. Timing does not depend on the weights' values, so the video itself is noise.

Everything a user waits for counts: loading each file, text encoding, the three stages' sampling, both VAE
decodes and writing the mp4. Per node, the time is from the server's `executing` message for it to the
next one. The peak is the GPU's used memory polled with nvidia-smi every 0.2 s, less what was used before
the server started: everything the server process holds (CUDA context, cached and pooled memory), an
upper bound of what the nodes needed.

`--card-gib 12` runs the job as on a 12 GiB card with nothing else on it: this script holds the rest of
the GPU's memory for the run, so ComfyUI sees 12 GiB free, plans its model loading for that, and any
allocation past it (its own CUDA context included) fails in the driver, as it would there.
`--vsr-overlap 0` (default) runs the VSR on 8-frame chunks without overlap, as the paper's settings do
(the shipped workflow overlaps chunks by 2 frames for smoother seams, which costs about a quarter more
VSR time); `--host-args` passes options to ComfyUI's main.py (e.g. `--disable-cuda-malloc`).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_host import HOST_DIR, ComfyServer, ExecutionFailed  # noqa: E402
from speed import random_model  # noqa: E402

from lavie_core.vae import AutoencoderKL, VAEConfig  # noqa: E402

# The pack's file names, read without importing the `nodes` package (which needs ComfyUI).
_spec = importlib.util.spec_from_file_location("lavie_defaults", ROOT / "nodes" / "defaults.py")
defaults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(defaults)
RELEASED_UNETS, TEXT_ENCODER_DIR, TINY_DIR = defaults.RELEASED_UNETS, defaults.TEXT_ENCODER_DIR, defaults.TINY_DIR
VAE_X4_FILE, VAE_X8_FILE = defaults.VAE_X4_FILE, defaults.VAE_X8_FILE

WORKFLOW = ROOT / "workflows" / "api" / "lavie_full_cascade.json"
TOKENIZER = ROOT / "bundled" / TINY_DIR / TEXT_ENCODER_DIR
# Per VAE kind (the components loader's `vae` input): the components folder, the text encoder's (hidden,
# layers, heads, activation) as released (SD 1.x's CLIP ViT-L/14, the x4 upscaler's OpenCLIP ViT-H/14 text
# tower), and the VAE's file and config.
COMPONENTS = {
    "x8": ("random-sd", (768, 12, 12, "quick_gelu"), VAE_X8_FILE, VAEConfig.sd),
    "x4": ("random-x4", (1024, 23, 16, "gelu"), VAE_X4_FILE, VAEConfig.x4_upscaler),
}
UNET_FILES = {kind: Path(name).with_suffix(".safetensors").name for kind, name in RELEASED_UNETS.items()}


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".partial")
    save_file({k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in state.items()}, str(tmp))
    tmp.replace(path)  # a run stopped half-way leaves no file that looks complete


def _random_vae(config: VAEConfig, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoencoderKL(config).state_dict()


def _write_text_encoder(folder: Path, hidden: int, layers: int, heads: int, act: str, seed: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = json.loads((TOKENIZER / "config.json").read_text())
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=hidden,
        bos_token_id=tokenizer["bos_token_id"], eos_token_id=tokenizer["eos_token_id"],
        pad_token_id=tokenizer["pad_token_id"],
    )
    torch.manual_seed(seed)
    CLIPTextModel(config).half().save_pretrained(str(folder))
    for f in TOKENIZER.iterdir():
        if f.name != "config.json" and not f.name.endswith(".safetensors"):
            shutil.copyfile(f, folder / f.name)


def write_random_weights(lavie_dir: Path, seed: int) -> None:
    """Random weights of the released shapes under `lavie_dir` (see the module's docstring); files already
    there are kept."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lavie_dir.mkdir(parents=True, exist_ok=True)
    for i, (kind, name) in enumerate(UNET_FILES.items()):
        if not (lavie_dir / name).exists():
            print(f"writing {name}", flush=True)
            _save(random_model(kind, device, seed + i).state_dict(), lavie_dir / name)
    for i, (folder, (hidden, layers, heads, act), vae_file, vae_config) in enumerate(COMPONENTS.values()):
        root = lavie_dir / folder
        if not (root / TEXT_ENCODER_DIR / "model.safetensors").exists():
            print(f"writing {folder}/{TEXT_ENCODER_DIR}", flush=True)
            _write_text_encoder(root / TEXT_ENCODER_DIR, hidden, layers, heads, act, seed + 10 + i)
        if not (root / vae_file).exists():
            print(f"writing {folder}/{vae_file}", flush=True)
            _save(_random_vae(vae_config(), device, seed + 20 + i), root / vae_file)


def paper_graph(steps: int, seed: int, vsr_overlap: int, vsr_chunk: int = 8) -> dict:
    """The shipped full-cascade graph with the random weights, at the paper's sizes and settings."""
    graph = json.loads(WORKFLOW.read_text())
    unets = iter(UNET_FILES.values())
    for node in graph.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "LaVieLoader":
            inputs["ckpt_name"] = next(unets)
        elif kind == "LaVieComponentsLoader":
            inputs["components"] = COMPONENTS[inputs["vae"]][0]
        elif kind == "LaVieSampler":
            inputs.update(frames=16, width=512, height=320)
        elif kind == "LaVieUpscale":
            inputs.update(chunk_frames=vsr_chunk, chunk_overlap=vsr_overlap)
        if "steps" in inputs:
            inputs.update(steps=steps, seed=seed)
    return graph


class GpuMemoryPoll:
    """The GPU's used memory (MiB, nvidia-smi) while the block runs: `samples` of (time.monotonic(), MiB)."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.samples, self._stop = interval, [], threading.Event()

    @property
    def peak_mib(self) -> int:
        return max((mib for _, mib in self.samples), default=0)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), _used_mib()))
            self._stop.wait(self.interval)

    def __enter__(self) -> "GpuMemoryPoll":
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def ballast_bytes(free: int, card_gib: float) -> int:
    """Bytes to hold so that `card_gib` GiB of the `free` bytes stay free."""
    keep = int(card_gib * 2**30)
    if keep <= 0:
        raise ValueError(f"--card-gib must be positive, got {card_gib}")
    if keep > free:
        raise ValueError(f"--card-gib {card_gib}: the GPU has only {free / 2**30:.2f} GiB free")
    return free - keep


def _used_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else 0


def node_spans(messages: list[dict]) -> list[tuple[str, float, float]]:
    """(node id, start, end) in execution order: from each `executing` message's arrival to the next one's."""
    marks = [(m["data"].get("node"), m["received"]) for m in messages if m["type"] == "executing"]
    return [(node, start, end) for (node, start), (_, end) in zip(marks, marks[1:]) if node is not None]


def node_times(messages: list[dict], graph: dict) -> list[tuple[str, str, float]]:
    """(node id, class, seconds) in execution order (`node_spans`)."""
    return [(node, graph[node]["class_type"], end - start) for node, start, end in node_spans(messages)]


def node_peaks(messages: list[dict], samples: list[tuple[float, int]], before_mib: int) -> dict[str, float]:
    """Each node's peak of the polled GPU memory (GiB above `before_mib`) while it ran (`node_spans`); a node
    shorter than the polling interval may have no sample."""
    peaks: dict[str, float] = {}
    for node, start, end in node_spans(messages):
        inside = [mib for t, mib in samples if start <= t < end]
        if inside:
            peaks[node] = (max(inside) - before_mib) / 1024
    return peaks


def progress_spans(messages: list[dict], t0: float) -> list[dict]:
    """Each progress bar's node, length and the seconds (from t0) of its first and last tick: a stage's
    sampling and its VAE decode are separate bars of one node."""
    spans: list[dict] = []
    for m in messages:
        if m["type"] != "progress":
            continue
        d, t = m["data"], m["received"] - t0
        last = spans[-1] if spans else None
        if last is None or last["node"] != d.get("node") or last["max"] != d["max"] or d["value"] < last["value"]:
            spans.append({"node": d.get("node"), "max": d["max"], "first_s": t, "last_s": t, "value": d["value"]})
        else:
            last.update(last_s=t, value=d["value"])
    return spans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", type=Path, default=HOST_DIR, help="a ComfyUI tree (main.py)")
    parser.add_argument("--work", type=Path, default=ROOT / "output" / "comfy-cascade",
                        help="the server's work folder; the random weights are kept under models/lavie there")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps of every stage (the paper's 50)")
    parser.add_argument("--vsr-chunk", type=int, default=8, help="frames per VSR chunk (the paper's 8)")
    parser.add_argument("--vsr-overlap", type=int, default=0, help="frames shared by neighbouring VSR chunks")
    parser.add_argument("--card-gib", type=float,
                        help="leave ComfyUI only this much free GPU memory, as on a card of that size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--host-args", nargs=argparse.REMAINDER, default=[], help="options for ComfyUI's main.py")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")

    started = time.time()
    write_random_weights(args.work / "models" / "lavie", args.seed)
    weights_s = time.time() - started
    graph = paper_graph(args.steps, args.seed, args.vsr_overlap, args.vsr_chunk)
    torch.cuda.empty_cache()
    ballast = None
    if args.card_gib is not None:
        try:
            ballast = torch.empty(ballast_bytes(torch.cuda.mem_get_info()[0], args.card_gib), dtype=torch.uint8,
                                  device="cuda")
        except ValueError as e:
            parser.error(str(e))
    free_gib = torch.cuda.mem_get_info()[0] / 2**30
    before_mib = _used_mib()
    with ComfyServer(work_dir=args.work, host_dir=args.host, cpu=False, extra_args=tuple(args.host_args)) as server:
        with GpuMemoryPoll() as memory:
            t0 = time.monotonic()
            prompt_id = server.queue(graph)
            entry = server.wait(prompt_id, timeout=3600, check=False)
            total = time.monotonic() - t0
        failed = entry.get("status", {}).get("status_str") == "error"
        videos = [] if failed else [p for p in server.output_files(prompt_id) if p.suffix in (".mp4", ".webm")]
        log = server.log()
        messages = server.messages(prompt_id)
        times = node_times(messages, graph)
        peaks = node_peaks(messages, memory.samples, before_mib)
        bars = progress_spans(messages, t0)
    del ballast
    device_line = next((line for line in log.splitlines() if line.startswith("Device:")), "")
    report = {"gpu": torch.cuda.get_device_name(), "host_device": device_line, "steps": args.steps,
              "vsr_chunk": args.vsr_chunk, "vsr_overlap": args.vsr_overlap, "card_gib": args.card_gib, "free_at_start_gib": free_gib,
              "total_s": total, "peak_gpu_gib": (memory.peak_mib - before_mib) / 1024,
              "error": str(ExecutionFailed(prompt_id, entry)) if failed else None,
              "nodes": [{"node": n, "class": c, "s": s, "peak_gib": peaks.get(n)} for n, c, s in times],
              "weights_written_s": weights_s, "progress_bars": bars}
    print(f"{report['gpu']}; {device_line}")
    for n, c, s in times:
        peak = f"{peaks[n]:6.2f} GiB" if n in peaks else ""
        print(f"  node {n:>3s} {c:24s} {s:8.2f} s {peak}")
    for bar in bars:
        print(f"  bar of node {bar['node']:>3s}: {bar['value']}/{bar['max']} ticks, {bar['first_s']:.2f}-{bar['last_s']:.2f} s")
    if failed:
        print(report["error"])
    else:
        import cv2

        cap = cv2.VideoCapture(str(videos[0]))
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        size = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        cap.release()
        report["video"] = {"file": videos[0].name, "frames": frames, "width": size[0], "height": size[1]}
        print(f"cascade through ComfyUI: {total:.1f} s, GPU peak {report['peak_gpu_gib']:.2f} GiB (nvidia-smi, the "
              f"server's; {free_gib:.2f} GiB were free at its start), {frames} frames at {size[0]}x{size[1]}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
