"""Windowed evaluation of a sigma-space denoiser over `b c f h w` latents (MultiDiffusion-style).

At every sampler step the wrapped denoiser runs on overlapping windows (spatial tiles times temporal
chunks) and the x0 predictions are blended with normalised weights. The sampler therefore still sees
one x0 per step for the whole latent, and disagreements between neighbouring windows are averaged
at every step instead of being frozen into a visible seam at the end.

Weights are separable: a 1-D ramp per axis, normalised per axis so that the weights of all spans
covering a position sum to 1. Because windows form a product grid of frame, row and column spans,
the product of per-axis normalised weights is normalised over windows too, and no full-size weight
map is ever built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

import torch

__all__ = [
    "Span",
    "Window",
    "tile_spans",
    "blend_weights",
    "axis_weights",
    "plan_windows",
    "TiledDenoiser",
]

Span = tuple[int, int]
Conditioning = Union[Mapping[str, torch.Tensor], Callable[["Window"], Mapping[str, torch.Tensor]]]

# Weight at the outermost pixel of an inner edge. It keeps every covered position's weight sum
# positive even where only ramp ends overlap, while contributing next to nothing there.
EDGE_EPS = 1e-3


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def tile_spans(size: int, tile: int | None, overlap: int = 0) -> list[Span]:
    """Half-open spans covering ``[0, size)`` in order; the last one always ends at ``size``.

    ``tile=None`` or ``tile >= size`` gives the single span ``(0, size)``. With ``overlap == 0``
    the spans partition the axis and the last one holds the remainder (this is how the official
    VSR pipeline cuts frames into chunks of 8: 61 -> 7 x 8 + 5). With ``overlap > 0`` every span
    is ``tile`` long, consecutive starts are ``tile - overlap`` apart, and the last span is moved
    back flush with the end, so it may overlap its neighbour by more than ``overlap``: a short
    last window would give the network too little context.
    """
    _check_int("size", size, 1)
    _check_int("overlap", overlap, 0)
    if tile is None:
        return [(0, size)]
    _check_int("tile", tile, 1)
    if overlap >= tile:
        raise ValueError(f"overlap must be smaller than the tile ({tile}), got {overlap}")
    if tile >= size:
        return [(0, size)]
    if overlap == 0:
        return [(start, min(start + tile, size)) for start in range(0, size, tile)]
    stride = tile - overlap
    spans = []
    start = 0
    while start + tile < size:
        spans.append((start, start + tile))
        start += stride
    spans.append((size - tile, size))
    return spans


def _ramp(length: int) -> torch.Tensor:
    """Raised-cosine rise over ``length`` pixels, sampled at pixel centres, floored at EDGE_EPS.

    sin^2 and cos^2 sum to 1, so two opposing ramps over exactly ``length`` shared pixels already
    form a partition of unity; normalisation handles every other overlap.
    """
    r = (torch.arange(length, dtype=torch.float64) + 0.5) / length
    return torch.sin(r * (math.pi / 2)).square().clamp_min(EDGE_EPS)


def blend_weights(span: Span, size: int, overlap: int) -> torch.Tensor:
    """Unnormalised float64 weights of one span: 1 inside, ramping down over ``overlap`` pixels
    towards each edge that lies inside the axis. Edges on the axis border keep weight 1, since no
    other window covers the pixels beyond them.
    """
    start, stop = span
    if not 0 <= start < stop <= size:
        raise ValueError(f"span {span} is not inside [0, {size})")
    weights = torch.ones(stop - start, dtype=torch.float64)
    if overlap > 0:
        k = min(overlap, stop - start)
        ramp = _ramp(overlap)[:k]
        if start > 0:
            weights[:k] = torch.minimum(weights[:k], ramp)
        if stop < size:
            weights[-k:] = torch.minimum(weights[-k:], ramp.flip(0))
    return weights


def axis_weights(size: int, tile: int | None, overlap: int = 0) -> list[tuple[Span, torch.Tensor]]:
    """Spans of one axis with their float64 weights normalised so they sum to 1 at every position."""
    spans = tile_spans(size, tile, overlap)
    raw = [blend_weights(span, size, overlap) for span in spans]
    total = torch.zeros(size, dtype=torch.float64)
    for (start, stop), w in zip(spans, raw):
        total[start:stop] += w
    return [(span, w / total[span[0] : span[1]]) for span, w in zip(spans, raw)]


@dataclass(frozen=True)
class Window:
    """One window of a `b c f h w` latent with its normalised separable blend weights."""

    frames: Span
    rows: Span
    cols: Span
    frame_weights: torch.Tensor
    row_weights: torch.Tensor
    col_weights: torch.Tensor

    @property
    def index(self) -> tuple[slice, slice, slice, slice, slice]:
        return (
            slice(None),
            slice(None),
            slice(*self.frames),
            slice(*self.rows),
            slice(*self.cols),
        )

    def crop(self, tensor: torch.Tensor) -> torch.Tensor:
        """``b c F H W -> b c f h w``: this window of a full-size tensor."""
        return tensor[self.index]

    def weight(self, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """Blend weights `f h w`, the outer product of the three axis weights."""
        w = torch.einsum("f,h,w->fhw", self.frame_weights, self.row_weights, self.col_weights)
        return w.to(device=device, dtype=dtype)


def _pair(name: str, value: int | tuple[int, int] | None) -> tuple[int | None, int | None]:
    if value is None or isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return value[0], value[1]
    raise TypeError(f"{name} must be an int, a pair of ints or None, got {value!r}")


def plan_windows(
    frames: int,
    height: int,
    width: int,
    *,
    tile: int | tuple[int, int] | None = None,
    overlap: int | tuple[int, int] = 0,
    chunk_frames: int | None = None,
    chunk_overlap: int = 0,
) -> list[Window]:
    """Every window of an ``F x H x W`` latent, frames outermost then rows then columns.

    ``tile`` is the spatial window (one int for square tiles, or ``(th, tw)``), ``chunk_frames``
    the temporal one; ``None`` means the whole axis.
    """
    tile_h, tile_w = _pair("tile", tile)
    overlap_h, overlap_w = _pair("overlap", overlap)
    frame_axis = axis_weights(frames, chunk_frames, chunk_overlap)
    row_axis = axis_weights(height, tile_h, overlap_h if overlap_h is not None else 0)
    col_axis = axis_weights(width, tile_w, overlap_w if overlap_w is not None else 0)
    return [
        Window(fs, rs, cs, fw, rw, cw)
        for fs, fw in frame_axis
        for rs, rw in row_axis
        for cs, cw in col_axis
    ]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # MPS has no float64; sigma is the only float64 input a denoiser gets.
    if device.type == "mps" and t.dtype == torch.float64:
        return t.to(device=device, dtype=torch.float32)
    return t.to(device)


class TiledDenoiser:
    """Blend a denoiser ``model(x, sigma, **kwargs) -> x0`` over windows of `b c f h w` latents.

    ``x`` and the result stay where ``x`` lives (e.g. the CPU for a latent too big for the
    accelerator); each window is copied to ``device`` (default: ``x``'s device) for the model call
    and its x0 copied back. ``conditioning`` holds inputs that vary over frames and pixels (the
    tensors a network concatenates on channels): either a dict of full-size `b c F H W` tensors,
    cropped like ``x`` and passed as keyword arguments, or ``conditioning(window) -> dict`` for
    anything else. Other keyword arguments (text states) reach every call unchanged.
    ``on_call(done, total)`` runs after every window; an exception raised there aborts the call.

    A single window covering everything is evaluated exactly like the bare model.
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        *,
        tile: int | tuple[int, int] | None = None,
        overlap: int | tuple[int, int] = 0,
        chunk_frames: int | None = None,
        chunk_overlap: int = 0,
        conditioning: Conditioning | None = None,
        on_call: Callable[[int, int], None] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.model = model
        self.tile = tile
        self.overlap = overlap
        self.chunk_frames = chunk_frames
        self.chunk_overlap = chunk_overlap
        self.conditioning = conditioning
        self.on_call = on_call
        self.device = None if device is None else torch.device(device)
        self._plans: dict[tuple[int, int, int], list[Window]] = {}
        # Validates the parameters now rather than at the first sampler step.
        plan_windows(1, 1, 1, tile=tile, overlap=overlap, chunk_frames=chunk_frames, chunk_overlap=chunk_overlap)

    def windows(self, frames: int, height: int, width: int) -> list[Window]:
        key = (frames, height, width)
        plan = self._plans.get(key)
        if plan is None:
            plan = plan_windows(
                frames,
                height,
                width,
                tile=self.tile,
                overlap=self.overlap,
                chunk_frames=self.chunk_frames,
                chunk_overlap=self.chunk_overlap,
            )
            self._plans[key] = plan
        return plan

    def _window_conditioning(
        self, window: Window, fhw: tuple[int, int, int], device: torch.device
    ) -> dict[str, torch.Tensor]:
        if self.conditioning is None:
            return {}
        if callable(self.conditioning):
            values = self.conditioning(window)
        else:
            values = {}
            for name, tensor in self.conditioning.items():
                if tensor.ndim != 5 or tuple(tensor.shape[-3:]) != fhw:
                    raise ValueError(
                        f"conditioning {name!r} must be [B, C, {fhw[0]}, {fhw[1]}, {fhw[2]}] like x, "
                        f"got {list(tensor.shape)}"
                    )
                values[name] = window.crop(tensor)
        return {name: _to_device(t, device) for name, t in values.items()}

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"TiledDenoiser needs x shaped [B, C, F, H, W], got {list(x.shape)}")
        fhw = tuple(x.shape[-3:])
        windows = self.windows(*fhw)
        device = self.device or x.device
        sigma_dev = _to_device(sigma, device)
        out: torch.Tensor | None = None
        for i, window in enumerate(windows):
            cond = self._window_conditioning(window, fhw, device)
            x0 = self.model(_to_device(window.crop(x), device), sigma_dev, **kwargs, **cond)
            x0 = x0.to(device=x.device, dtype=x.dtype)
            if len(windows) == 1:
                out = x0
            else:
                if out is None:
                    out = torch.zeros_like(x)
                out[window.index] += x0 * window.weight(dtype=x.dtype, device=x.device)
            if self.on_call is not None:
                self.on_call(i + 1, len(windows))
        assert out is not None
        return out
