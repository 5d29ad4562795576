"""A synthetic video world with exact ground truth, for training and scoring the tiny cascade.

A scene is one coloured shape moving in a straight line across a flat background. Scenes live in
continuous space ([0, 1]^2, y pointing down) and continuous time (base-frame units, 0 .. REF_FRAMES - 1),
so a clip renders at any resolution and any frame rate: the interpolation target is the same scene at four
times the frame rate, the super-resolution target the same scene at four times the size. Edges are
anti-aliased analytically, so a render at 64 px is (up to rounding) the area-average of one at 256 px.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.62, 0.20, 0.80),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
    "gray": (0.50, 0.50, 0.50),
}
SHAPE_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
BACKGROUNDS: tuple[str, ...] = ("black", "gray", "blue", "green")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Unit vectors in image coordinates (y grows downwards).
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}

REF_FRAMES = 16
HELD_OUT_COUNT = 24
HELD_OUT_SEED = 2023

# Equal-area shapes, so that size says nothing about the shape: areas equal pi * r^2.
_SQUARE_HALF = math.sqrt(math.pi) / 2
_TRIANGLE_SIDE = math.sqrt(4 * math.pi / math.sqrt(3))
# Farthest extent of any shape from its centroid (the triangle's apex), in units of r.
_EXTENT = _TRIANGLE_SIDE / math.sqrt(3)


@dataclass(frozen=True)
class Combo:
    """What a caption names: the content of a scene up to position, size and speed."""

    colour: str
    shape: str
    direction: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} on a {self.background} background"


def all_combos() -> list[Combo]:
    return [
        Combo(c, s, d, b)
        for c, s, d, b in itertools.product(SHAPE_COLOURS, SHAPES, DIRECTIONS, BACKGROUNDS)
        if c != b
    ]


def _split() -> tuple[list[Combo], list[Combo]]:
    combos = all_combos()
    order = list(range(len(combos)))
    random.Random(HELD_OUT_SEED).shuffle(order)
    held = set(order[:HELD_OUT_COUNT])
    return [c for i, c in enumerate(combos) if i not in held], [c for i, c in enumerate(combos) if i in held]


TRAIN_COMBOS, HELD_OUT_COMBOS = _split()


def combos_for(split: str) -> list[Combo]:
    if split == "train":
        return TRAIN_COMBOS
    if split == "heldout":
        return HELD_OUT_COMBOS
    if split == "all":
        return all_combos()
    raise ValueError(f"unknown split {split!r}; expected 'train', 'heldout' or 'all'")


def parse_caption(text: str) -> Combo | None:
    """The combo a world caption names, or None for any other text."""
    words = text.strip().lower().split()
    if len(words) != 9 or words[0] != "a" or words[3] != "moving" or words[5:7] != ["on", "a"]:
        return None
    combo = Combo(words[1], words[2], words[4], words[7])
    return combo if combo in set(all_combos()) else None


@dataclass
class Scenes:
    """A batch of scenes as tensors (one row per scene), ready to render on any device."""

    combos: list[Combo]
    shape_rgb: torch.Tensor  # [B, 3] in [0, 1]
    background_rgb: torch.Tensor  # [B, 3]
    shape_id: torch.Tensor  # [B] index into SHAPES
    start: torch.Tensor  # [B, 2] centroid (x, y) at time 0
    velocity: torch.Tensor  # [B, 2] per base frame
    radius: torch.Tensor  # [B] equal-area radius

    @property
    def captions(self) -> list[str]:
        return [c.caption for c in self.combos]

    def __len__(self) -> int:
        return len(self.combos)

    def to(self, device: torch.device | str) -> Scenes:
        return Scenes(
            self.combos,
            *(t.to(device) for t in (self.shape_rgb, self.background_rgb, self.shape_id, self.start, self.velocity, self.radius)),
        )

    def position(self, times: torch.Tensor) -> torch.Tensor:
        """Centroids `[B, T, 2]` at times `[T]` or `[B, T]` (base-frame units)."""
        times = times.to(self.start.device, torch.float32)
        if times.ndim == 1:
            times = times.expand(len(self), -1)
        return self.start[:, None] + self.velocity[:, None] * times[..., None]


def sample_scenes(
    n: int,
    generator: torch.Generator,
    *,
    split: str = "train",
    combos: list[Combo] | None = None,
) -> Scenes:
    """`n` random scenes whose content is drawn from `combos` (default: the split's list)."""
    pool = combos if combos is not None else combos_for(split)
    idx = torch.randint(len(pool), (n,), generator=generator).tolist()
    return scenes_for([pool[i] for i in idx], generator)


def scenes_for(chosen: list[Combo], generator: torch.Generator) -> Scenes:
    """One scene per combo, with random size, start and speed.

    Deterministic given the generator state. Every scene stays fully inside the frame for the
    whole clip, times 0 .. REF_FRAMES - 1.
    """
    n = len(chosen)
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    radius = 0.11 + 0.05 * u[:, 0]
    margin = _EXTENT * radius + 0.02
    span = 1 - 2 * margin
    distance = torch.minimum(0.30 + 0.15 * u[:, 1], span)
    direction = torch.tensor([DIRECTIONS[c.direction] for c in chosen], dtype=torch.float64)
    along_is_x = direction[:, 0] != 0
    sign = direction.sum(dim=1)
    # Along the motion: the path [p, p + sign * distance] fits in [margin, 1 - margin].
    lo = torch.where(sign > 0, margin, margin + distance)
    hi = torch.where(sign > 0, 1 - margin - distance, 1 - margin)
    along = lo + (hi - lo) * u[:, 2]
    across = margin + span * u[:, 3]
    start = torch.stack([torch.where(along_is_x, along, across), torch.where(along_is_x, across, along)], dim=1)
    velocity = direction * (distance / (REF_FRAMES - 1))[:, None]
    return Scenes(
        combos=chosen,
        shape_rgb=torch.tensor([COLOURS[c.colour] for c in chosen], dtype=torch.float32),
        background_rgb=torch.tensor([COLOURS[c.background] for c in chosen], dtype=torch.float32),
        shape_id=torch.tensor([SHAPES.index(c.shape) for c in chosen]),
        start=start.float(),
        velocity=velocity.float(),
        radius=radius.float(),
    )


def shape_distance(shape_id: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) from points offset (dx, dy) from the centroid to each shape.

    Exact for the circle and square; for the triangle it is the largest edge-line distance, exact
    inside and near edges, which is all anti-aliasing needs. All arguments broadcast together.
    """
    circle = torch.sqrt(dx * dx + dy * dy) - radius
    square = torch.maximum(dx.abs(), dy.abs()) - _SQUARE_HALF * radius
    side = _TRIANGLE_SIDE * radius
    height = side * math.sqrt(3) / 2
    # Apex up: base line at dy = h/3, two slanted edges through the apex at dy = -2h/3.
    base = dy - height / 3
    slant = (dx.abs() * math.sqrt(3) - (dy + 2 * height / 3)) / 2
    triangle = torch.maximum(base, slant)
    return torch.where(shape_id == 0, circle, torch.where(shape_id == 1, square, triangle))


def render(scenes: Scenes, times: torch.Tensor | list[float], size: int) -> torch.Tensor:
    """Video `[B, 3, T, size, size]` in [-1, 1] of every scene at the given times (base-frame units)."""
    times = torch.as_tensor(times, dtype=torch.float32, device=scenes.start.device)
    centre = scenes.position(times)  # B T 2
    axis = (torch.arange(size, device=centre.device, dtype=torch.float32) + 0.5) / size
    dx = axis[None, None, None, :] - centre[..., 0, None, None]
    dy = axis[None, None, :, None] - centre[..., 1, None, None]
    sid = scenes.shape_id[:, None, None, None]
    r = scenes.radius[:, None, None, None]
    coverage = (0.5 - shape_distance(sid, dx, dy, r) * size).clamp(0, 1)  # B T H W
    fg = scenes.shape_rgb[:, :, None, None, None]
    bg = scenes.background_rgb[:, :, None, None, None]
    video = bg + (fg - bg) * coverage[:, None]
    return video * 2 - 1


def base_times(frames: int = REF_FRAMES) -> torch.Tensor:
    """Times of a base clip of `frames` frames spanning the whole scene, 0 .. REF_FRAMES - 1."""
    return torch.linspace(0, REF_FRAMES - 1, frames, dtype=torch.float32)


def interpolated_times(frames: int = REF_FRAMES, factor: int = 4) -> torch.Tensor:
    """Times of the factor * (frames - 1) + 1 frames that interpolation makes from `frames` base frames."""
    return base_times(factor * (frames - 1) + 1)


def downsample(video: torch.Tensor, factor: int) -> torch.Tensor:
    """Area-average `[B, C, T, H, W]` by `factor` in H and W: what a camera of coarser pixels sees."""
    b, c, t, h, w = video.shape
    return video.reshape(b, c, t, h // factor, factor, w // factor, factor).mean(dim=(4, 6))


# ---------------------------------------------------------------------------------------------------
# Detector: reads the content back from a video, for captions-vs-content checks and prompt adherence.


@dataclass
class Detection:
    colour: str
    shape: str
    direction: str
    background: str
    area: torch.Tensor  # [T] shape area in pixels
    centroid: torch.Tensor  # [T, 2] in pixels (x, y)
    visible: torch.Tensor  # [T] bool: frames where a shape was found

    def matches(self, combo: Combo) -> dict[str, bool]:
        got = {"colour": self.colour, "shape": self.shape, "direction": self.direction, "background": self.background}
        out = {k: got[k] == getattr(combo, k) for k in got}
        out["all"] = all(out.values())
        return out


def _nearest(rgb: torch.Tensor, names: tuple[str, ...]) -> str:
    table = torch.tensor([COLOURS[n] for n in names], dtype=rgb.dtype, device=rgb.device)
    return names[int((table - rgb).norm(dim=1).argmin())]


def _smooth(frames: torch.Tensor) -> torch.Tensor:
    """Binomial blur (sigma ~ 1 px) of `[N, C, H, W]`: lowers pixel noise and leaves the shape cues intact."""
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=frames.dtype) / 16
    c = frames.shape[1]
    x = F.pad(frames, (2, 2, 0, 0), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    x = F.pad(x, (0, 0, 2, 2), mode="replicate")
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def _central_cumulants(weight: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second, third and fourth cumulants of coordinate `u` under per-frame weights, both `[T, H, W]`."""
    mass = weight.sum(dim=(1, 2)).clamp(min=1e-6)
    mean = (weight * u).sum(dim=(1, 2)) / mass
    c = u - mean[:, None, None]
    m2, m3, m4 = ((weight * c**k).sum(dim=(1, 2)) / mass for k in (2, 3, 4))
    return m2, m3, m4 - 3 * m2**2


def detect(video: torch.Tensor) -> Detection:
    """Colour, shape, direction and background of one video `[3, T, H, W]` in [-1, 1].

    Background: median of the border pixels; shape colour: median of the pixels farthest from it.
    Coverage is each pixel's projection onto the background-to-shape colour line. The shape is read
    from cumulants of the coverage, which a symmetric blur leaves alone (third) or shifts equally in
    every direction (fourth): the apex-up triangle is the only skewed shape along y, and the square's
    fourth cumulant along the diagonals is half that along the axes, where the circle's is the same.
    Direction is the dominant axis and sign of the centroid's least-squares velocity.
    """
    video = ((video.float().clamp(-1, 1) + 1) / 2).cpu()
    _, t, h, w = video.shape
    pixels = _smooth(video.permute(1, 0, 2, 3)).permute(0, 2, 3, 1)  # T H W 3
    border = torch.cat([pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], dim=1).reshape(-1, 3)
    bg = border.median(dim=0).values
    dist = (pixels - bg).norm(dim=-1)
    far = dist >= 0.6 * dist.max().clamp(min=1e-6)
    fg = pixels[far].median(dim=0).values
    line = fg - bg
    alpha = (((pixels - bg) @ line) / line.dot(line).clamp(min=1e-6)).clamp(0, 1)
    solid = (alpha > 0.5).float()
    area = solid.sum(dim=(1, 2))
    ys = (torch.arange(h, dtype=torch.float32) + 0.5)[None, :, None].expand(t, h, w)
    xs = (torch.arange(w, dtype=torch.float32) + 0.5)[None, None, :].expand(t, h, w)
    safe = area.clamp(min=1)
    cx = (solid * xs).sum(dim=(1, 2)) / safe
    cy = (solid * ys).sum(dim=(1, 2)) / safe
    visible = (area > 0.004 * h * w) if bool(line.norm() > 0.15) else torch.zeros(t, dtype=torch.bool)

    shape = SHAPES[0]
    direction = next(iter(DIRECTIONS))
    if visible.any():
        frames = visible.nonzero().squeeze(1)
        dx, dy = xs[frames] - cx[frames, None, None], ys[frames] - cy[frames, None, None]
        reach = 2.2 * torch.sqrt(area[frames] / math.pi)[:, None, None]
        weight = alpha[frames] * (dx * dx + dy * dy <= reach * reach)
        k2, k3, _ = _central_cumulants(weight, dy)
        skew = float((k3 / k2.clamp(min=1e-6) ** 1.5).median())
        axis = sum(_central_cumulants(weight, u)[2] for u in (dx, dy))
        diagonal = sum(_central_cumulants(weight, u)[2] for u in ((dx + dy) / math.sqrt(2), (dx - dy) / math.sqrt(2)))
        ratio = float((diagonal / axis.clamp(max=-1e-6)).median())
        shape = "triangle" if skew < -0.25 else ("square" if ratio < 0.75 else "circle")
        if frames.numel() >= 2:
            tt = frames.float() - frames.float().mean()
            vx = (tt * (cx[frames] - cx[frames].mean())).sum() / tt.pow(2).sum()
            vy = (tt * (cy[frames] - cy[frames].mean())).sum() / tt.pow(2).sum()
            if vx.abs() >= vy.abs():
                direction = "right" if vx > 0 else "left"
            else:
                direction = "down" if vy > 0 else "up"
    return Detection(
        colour=_nearest(fg, SHAPE_COLOURS),
        shape=shape,
        direction=direction,
        background=_nearest(bg, BACKGROUNDS),
        area=area,
        centroid=torch.stack([cx, cy], dim=1),
        visible=visible,
    )
