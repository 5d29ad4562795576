"""Decoding video latents to frames, and saving frames as a video file."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from . import bridge
from .common import CATEGORY
from .models import LaVieError, decode_frames

PREVIEW_MAX_SIDE = 512
# Codecs tried per container, best first. H.264 plays in every browser but the pip OpenCV wheels
# usually lack an encoder for it; MPEG-4 part 2 always works but most browsers will not play it.
CODECS = {"mp4": ("avc1", "mp4v"), "webm": ("VP90", "VP80")}
MIME = {"mp4": "video/mp4", "webm": "video/webm"}
_codec_lock = threading.Lock()
_working_codec: dict[str, str] = {}


class LaVieDecode:
    DESCRIPTION = (
        "Decodes a LaVie video latent to frames, a few frames at a time, streaming each chunk to the CPU so "
        "long videos fit. Takes the pack's VAE or ComfyUI's (an SD 1.x checkpoint's for base and "
        "interpolation latents)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The frames, [F, H, W, 3] in 0..1.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "vae": ("VAE", {"tooltip": "VAE matching the latent: x8 (Stable Diffusion) for base and interpolation latents."}),
            "latent": ("LATENT", {"tooltip": "Video latent, frames as the batch (LaVie Sampler / Interpolate)."}),
            "frame_chunk": ("INT", {"default": 8, "min": 1, "max": 1024, "tooltip": (
                "Frames decoded at once; lower it if decoding runs out of memory.")}),
            "overlap": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": (
                "Frames shared by neighbouring chunks, for decoders that look across frames; the Stable "
                "Diffusion VAE decodes every frame on its own, so it has no effect there.")}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, frame_chunk: int, overlap: int) -> bool | str:
        if frame_chunk is None or overlap is None:
            return True
        if int(frame_chunk) < 1:
            return f"frame_chunk must be at least 1, got {frame_chunk}"
        if int(overlap) < 0 or int(overlap) >= int(frame_chunk):
            return f"overlap ({overlap}) must be in 0..frame_chunk-1 ({int(frame_chunk) - 1})"
        return True

    def decode(self, vae: Any, latent: dict, frame_chunk: int = 8, overlap: int = 0) -> tuple[torch.Tensor]:
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
            raise LaVieError("LaVie Decode: the latent input holds no video latent [F, 4, h, w]")
        if vae is None or not hasattr(vae, "decode"):
            raise LaVieError(f"LaVie Decode: the vae input is not a VAE (got {type(vae).__name__})")
        bar = bridge.progress(samples.shape[0], latent_format=None)
        return (decode_frames(vae, samples, chunk=frame_chunk, progress=bar),)


# ----------------------------------------------------------------------------- saving
def to_uint8(images: torch.Tensor) -> np.ndarray:
    """IMAGE frames ``[F, H, W, C]`` in 0..1 as uint8 RGB ``[F, H, W, 3]``, rounded to nearest."""
    # A frame at a time through one float buffer: whole-batch arithmetic on 61 frames of 1280x2048 made
    # four 1.9 GB temporaries and took 5.5 s on two cores, a frame at a time 0.5 s.
    out = torch.empty((*images.shape[:-1], 3), dtype=torch.uint8)
    buf = None
    for i, frame in enumerate(images):
        buf = torch.mul(frame[..., :3].to("cpu", torch.float32), 255.0, out=buf)
        out[i] = buf.clamp_(0.0, 255.0).round_()
    return out.numpy()


def _even(frame: np.ndarray) -> np.ndarray:
    # 4:2:0 encoders need even sizes; repeating the last row/column keeps every pixel.
    h, w = frame.shape[:2]
    if h % 2 or w % 2:
        frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return frame


def _open_writer(path: str, fmt: str, fps: float, size: tuple[int, int]) -> tuple[Any, str]:
    import cv2

    with _codec_lock:
        known = _working_codec.get(fmt)
        candidates = (known,) if known else CODECS[fmt]
        for codec in candidates:
            writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*codec), float(fps), size)
            if writer.isOpened():
                _working_codec[fmt] = codec
                return writer, codec
            writer.release()
            if os.path.exists(path):
                os.remove(path)
    raise LaVieError(
        f"LaVie Save Video: OpenCV on this machine cannot write {fmt} (tried codecs {', '.join(CODECS[fmt])}). "
        "Pick the other format, or install opencv-python-headless from PyPI, whose wheels include FFmpeg."
    )


def write_video(path: str, frames: np.ndarray, fps: float, fmt: str) -> str:
    """Write uint8 RGB frames `[F, H, W, 3]` to `path`; returns the codec used."""
    import cv2

    first = _even(frames[0])
    size = (first.shape[1], first.shape[0])
    writer, codec = _open_writer(path, fmt, fps, size)
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(np.ascontiguousarray(_even(frame)), cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return codec


def write_preview(path: str, frames: np.ndarray, fps: float) -> None:
    """Animated WEBP, at most PREVIEW_MAX_SIDE pixels on the long side (full-size VSR frames would take minutes)."""
    from PIL import Image

    h, w = frames.shape[1:3]
    scale = min(1.0, PREVIEW_MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    images = [Image.fromarray(f) for f in frames]
    if scale < 1.0:
        # reducing_gap: a box reduction to twice the size first, then Lanczos, which Pillow documents as
        # nearly indistinguishable from Lanczos alone; 61 frames of 1280x2048 in 0.9 s instead of 3.0.
        images = [im.resize(size, Image.LANCZOS, reducing_gap=2.0) for im in images]
    # method 2 of 0..6 (compression effort at the same quality): half method 4's time, 3% larger.
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)),
                   loop=0, quality=80, method=2)


class LaVieSaveVideo:
    DESCRIPTION = (
        "Saves frames as a video in ComfyUI's output folder (mp4 or webm, written with OpenCV) and shows an "
        "animated preview. mp4 uses H.264 where this OpenCV has it, else MPEG-4 part 2, which browsers may "
        "not play in place (the file itself is fine); webm (VP9) plays everywhere."
    )
    CATEGORY = CATEGORY
    FUNCTION = "save"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "images": ("IMAGE", {"tooltip": "Frames to save, in order."}),
            "fps": ("FLOAT", {"default": 8.0, "min": 0.1, "max": 240.0, "step": 0.5, "tooltip": (
                "Frames per second. LaVie's base video is 8 fps; interpolated videos (4n-3 frames) keep "
                "their length at about 4x that.")}),
            "filename_prefix": ("STRING", {"default": "LaVie", "tooltip": (
                "File name prefix inside the output folder; may contain a subfolder (LaVie/run1).")}),
            "format": (list(CODECS), {"default": "mp4", "tooltip": "Container: mp4 (H.264 or MPEG-4) or webm (VP9)."}),
        }}

    def save(self, images: torch.Tensor, fps: float = 8.0, filename_prefix: str = "LaVie",
             format: str = "mp4") -> dict:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
            raise LaVieError("LaVie Save Video: the images input holds no frames [F, H, W, 3]")
        if format not in CODECS:
            raise LaVieError(f"LaVie Save Video: unknown format {format!r}; choose one of {', '.join(CODECS)}")
        frames = to_uint8(images)
        count, height, width = frames.shape[:3]
        folder, stem, counter, subfolder = bridge.save_path(filename_prefix, bridge.output_directory(), width, height)
        name = f"{stem}_{counter:05}_.{format}"
        temp_folder, temp_stem, temp_counter, temp_sub = bridge.save_path(
            f"{stem}_preview", bridge.temp_directory(), width, height)
        preview = f"{temp_stem}_{temp_counter:05}_.webp"
        # Both encoders release the GIL, so the preview costs no wall time next to the video.
        with ThreadPoolExecutor(max_workers=1) as pool:
            previewing = pool.submit(write_preview, os.path.join(temp_folder, preview), frames, fps)
            codec = write_video(os.path.join(folder, name), frames, fps, format)
            previewing.result()

        video = {"filename": name, "subfolder": subfolder, "type": "output", "format": MIME[format],
                 "codec": codec, "fps": fps, "frames": count, "width": width, "height": height}
        return {"ui": {
            "images": [{"filename": preview, "subfolder": temp_sub, "type": "temp"}],
            "animated": (True,),
            "video": [video],
        }}


NODE_CLASS_MAPPINGS = {
    "LaVieDecode": LaVieDecode,
    "LaVieSaveVideo": LaVieSaveVideo,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LaVieDecode": "LaVie Decode",
    "LaVieSaveVideo": "LaVie Save Video",
}
