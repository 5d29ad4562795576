"""Flicker and drift of long videos (64 frames) from the base UNet, per method, and of the decoders.

    python bench/long_video.py [--model auto|gaussian|both] [--frames 64] [--steps 25] [--json out.json]

Models:
- ``gaussian``: an analytic video prior standing in for the UNet: every latent pixel is a stationary
  Gaussian process over frames (squared-exponential kernel, length 4 frames, unit variance) and the
  "network" returns the exact posterior-mean denoiser ``K (K + sigma^2 I)^-1 x`` for the frames it is
  given. Its true statistics are known (per-frame std 1, no drift, expected |x_t - x_{t-1}| =
  0.198, seam ratio 1), so it shows what each method does to a model that is right about the clips
  it sees. Text is ignored (cond = uncond).
- ``auto``: the bundled tiny set (bundled/lavie-tiny/: base UNet, text encoder, VAE) when it is there,
  otherwise a tiny random base UNet with random text states; the report says which. A random UNet
  cannot denoise: its latents have the size of the largest noise level (~100), so its figures only
  show the mechanics (seams, relative change), not quality.

Methods, all at the same seed, sampler and steps:
- independent: 16-frame clips sampled separately and concatenated (what no method gives);
- full: one text_to_video call over all frames (for the UNet: far beyond its 16 training frames);
- extend: recursive extension, 4 conditioning frames, plain replacement;
- extend_lvdm: the same with LVDM's settings (conditional latent perturbation at t=100, unconditional
  guidance w=0.1);
- window: sliding context windows of 16 frames overlapping by 4.

Per method and 16-frame segment, in latent space: ``frame_diff`` mean |x_t - x_{t-1}|, ``flicker``
mean |x_{t+1} - 2x_t + x_{t-1}|/2, and the drift of the per-frame mean/std from the first segment
(``lavie_core.long_video.segment_stats``); ``seam`` is the mean |x_t - x_{t-1}| at clip boundaries over
the mean elsewhere (1 = invisible). Then the decoders, on the Gaussian prior's window video: the SD VAE
(bundled, else tiny random) with and without the temporal bilateral filter, on the clean latents and
with small per-frame latent jitter added (flicker in pixels, and distance to the jitter-free decode),
and chunked decoding with a tiny random temporal (SVD-layout) decoder against the full decode.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lavie_core import LaVieUNet, UNetConfig, load_unet  # noqa: E402
from lavie_core.long_video import extend_video, segment_stats, sliding_window_video  # noqa: E402
from lavie_core.pipeline import text_to_video  # noqa: E402
from lavie_core.temporal_vae import (  # noqa: E402
    TemporalAutoencoder,
    TemporalVAEConfig,
    decode_video_smooth,
    decode_video_temporal,
    flicker_metrics,
)
from lavie_core.vae import AutoencoderKL, VAEConfig  # noqa: E402

BUNDLED = ROOT / "bundled" / "lavie-tiny"
PROMPT = "a panda playing guitar by a lake, 4k"


def _init(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("mix_factor"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def load_models(seed: int):
    """(unet, context, uncond, vae, description)."""
    base = BUNDLED / "base.safetensors"
    if base.is_file():
        from lavie_core.text import load_text_encoder
        from lavie_core.vae import load_vae

        unet = load_unet(base).eval()
        encoder = load_text_encoder(BUNDLED / "text_encoder")
        context, uncond = encoder.encode([PROMPT]).float(), encoder.encode([""]).float()
        vae = load_vae(BUNDLED / "vae.safetensors")
        return unet, context, uncond, vae, f"bundled model {BUNDLED.relative_to(ROOT)} (prompt {PROMPT!r})"
    unet = LaVieUNet(UNetConfig.tiny("base"))
    _init(unet, seed)
    for name, buf in unet.named_buffers():
        if name.endswith("freqs"):
            dim = 2 * buf.shape[0]
            buf.copy_(1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim))
    unet.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    dim = unet.config.cross_attention_dim
    context, uncond = torch.randn(1, 7, dim, generator=g), torch.zeros(1, 7, dim)
    vae = AutoencoderKL(VAEConfig.tiny(4))
    _init(vae, seed + 1)
    return unet, context, uncond, vae.eval(), "tiny random base UNet (UNetConfig.tiny), random text states, tiny random VAE"


class GaussianVideoPrior(torch.nn.Module):
    """Exact denoiser of a per-pixel stationary Gaussian process over frames, shaped like a base UNet."""

    def __init__(self, length: float = 4.0, schedule=None):
        super().__init__()
        from lavie_core.schedules import LAVIE_DIFFUSERS_SCHEDULE

        self.config = UNetConfig.tiny("base")
        self.length = length
        self.schedule = schedule or LAVIE_DIFFUSERS_SCHEDULE
        self._eig: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.register_buffer("anchor", torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def eig(self, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        if frames not in self._eig:
            i = torch.arange(frames, dtype=torch.float64)
            k = torch.exp(-((i[:, None] - i[None, :]) ** 2) / (2 * self.length**2)) + 1e-6 * torch.eye(frames)
            self._eig[frames] = torch.linalg.eigh(k)
        return self._eig[frames]

    def expected_frame_diff(self) -> float:
        return math.sqrt(2 * (1 - math.exp(-1 / (2 * self.length**2)))) * math.sqrt(2 / math.pi)

    def forward(self, x_vp: torch.Tensor, t: torch.Tensor, context: torch.Tensor, noise_level=None) -> torch.Tensor:
        sigma = self.schedule.t_to_sigma(t.double().cpu()).reshape(-1, 1)  # [B, 1]
        x = x_vp.double() * (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1, 1)
        lam, u = self.eig(x.shape[2])
        gain = lam[None, :] / (lam[None, :] + sigma**2)  # [B, F]
        coeff = torch.einsum("fk,bcfhw->bckhw", u, x)
        x0 = torch.einsum("fk,bckhw->bcfhw", u, coeff * gain[:, None, :, None, None])
        eps = (x - x0) / sigma.reshape(-1, 1, 1, 1, 1)
        return eps.to(x_vp.dtype)


def seam_ratio(video: torch.Tensor, boundaries: list[int]) -> float:
    diff = (video[:, :, 1:] - video[:, :, :-1]).abs().mean(dim=(0, 1, 3, 4))  # index t-1: pair (t-1, t)
    at = [b - 1 for b in boundaries if 0 < b < video.shape[2]]
    if not at:
        return float("nan")
    mask = torch.zeros_like(diff, dtype=torch.bool)
    mask[at] = True
    return float(diff[mask].mean() / diff[~mask].mean())


def run_methods(unet, context, uncond, args) -> dict[str, dict]:
    common = dict(height=args.size, width=args.size, steps=args.steps, sampler=args.sampler, seed=args.seed,
                  cfg=args.cfg)
    f = args.frames
    results = {}

    def timed(name, boundaries, fn):
        start = time.perf_counter()
        video = fn()
        seconds = time.perf_counter() - start
        results[name] = {"video": video, "seconds": seconds, "segments": segment_stats(video, 16),
                         "seam": seam_ratio(video, boundaries)}

    clips16 = list(range(16, f, 16))
    timed("independent", clips16, lambda: torch.cat(
        [text_to_video(unet, context, uncond, frames=min(16, f - s), **{**common, "seed": args.seed + s})
         for s in range(0, f, 16)], dim=2))
    timed("full", [], lambda: text_to_video(unet, context, uncond, frames=f, **common))
    ext_bounds = list(range(16, f, 12))
    timed("extend", ext_bounds, lambda: extend_video(unet, context, uncond, total_frames=f, **common))
    timed("extend_lvdm", ext_bounds, lambda: extend_video(unet, context, uncond, total_frames=f, cond_noise=100,
                                                          uncond_guidance=0.1, **common))
    timed("window", clips16, lambda: sliding_window_video(unet, context, uncond, frames=f, context_length=16,
                                                          context_overlap=4, **common))
    return results


def decoder_figures(vae: AutoencoderKL, latents: torch.Tensor, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    jittered = latents + 0.05 * torch.randn(latents.shape, generator=g)
    clean = decode_video_smooth(vae, latents, chunk=8)
    out: dict = {}
    for label, z in (("clean latents", latents), ("latents + 0.05 jitter", jittered)):
        plain = decode_video_smooth(vae, z, chunk=8)
        rows = {}
        for strength, sigma in ((0.0, 0.1), (0.5, 0.1), (1.0, 0.1), (1.0, 0.2)):
            dec = decode_video_smooth(vae, z, chunk=8, smooth=strength, sigma=sigma) if strength else plain
            m = flicker_metrics(dec)
            m["change_vs_plain"] = float((dec - plain).abs().mean())
            m["distance_to_clean_decode"] = float((dec - clean).abs().mean())
            rows["plain" if not strength else f"smooth {strength:g} sigma {sigma:g}"] = m
        out[label] = rows
    tvae = TemporalAutoencoder(TemporalVAEConfig.tiny(4))
    _init(tvae, seed + 2)
    tvae.eval().requires_grad_(False)
    z = latents[:, :, :32]
    full = decode_video_temporal(tvae, z, chunk=z.shape[2])
    scale = float(full.std())
    rows = {}
    for chunk, overlap in ((8, 0), (8, 2), (8, 4), (14, 4), (16, 6)):
        dec = decode_video_temporal(tvae, z, chunk=chunk, overlap=overlap)
        rows[f"chunk {chunk} overlap {overlap}"] = {
            "mean_err_rel": float((dec - full).abs().mean()) / scale,
            "max_err_rel": float((dec - full).abs().max()) / scale,
            "flicker": flicker_metrics(dec)["flicker"],
        }
    rows["full"] = {"flicker": flicker_metrics(full)["flicker"]}
    out["temporal_vae_random"] = rows
    return out


def print_methods(results: dict) -> None:
    print(f"{'method':<12} {'seconds':>8} {'seam':>6}  per 16-frame segment: "
          "[frame_diff flicker mean_drift std_drift]")
    for name, r in results.items():
        segs = "  ".join(
            f"[{s['frame_diff']:.3f} {s['flicker']:.3f} {s['mean_drift']:+.3f} {s['std_drift']:+.3f}]"
            for s in r["segments"]
        )
        print(f"{name:<12} {r['seconds']:8.1f} {r['seam']:6.2f}  {segs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("both", "gaussian", "auto"), default="both")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--size", type=int, default=64, help="frame height and width in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.frames} frames at {args.size}x{args.size} px, {args.sampler}, {args.steps} steps, cfg {args.cfg}, "
          f"seed {args.seed}; latent-space figures")

    payload: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    unet, context, uncond, vae, described = load_models(args.seed)
    runs = []
    if args.model in ("both", "gaussian"):
        prior = GaussianVideoPrior()
        zeros = torch.zeros(1, 7, prior.config.cross_attention_dim)
        runs.append(("gaussian", prior, zeros, zeros,
                     f"analytic Gaussian video prior (expected frame_diff {prior.expected_frame_diff():.3f}, "
                     "std 1, no drift, seam 1)"))
    if args.model in ("both", "auto"):
        runs.append(("auto", unet, context, uncond, described))
    window_video = None
    for key, model, ctx, unc, text in runs:
        print(f"\nmodel: {text}")
        results = run_methods(model, ctx, unc, args)
        print_methods(results)
        if key == "gaussian" or window_video is None:
            window_video = results["window"]["video"]
        payload["models"][key] = {"model": text, "methods": {
            k: {kk: vv for kk, vv in v.items() if kk != "video"} for k, v in results.items()}}

    decoded = decoder_figures(vae, window_video, args.seed)
    payload["decoders"] = decoded
    print(f"\nSD VAE ({'bundled' if 'bundled' in described else 'tiny random'}) decode of the window video, "
          "pixels: flicker / mean |x_t - x_t-1| / change vs plain / distance to the jitter-free decode")
    for label in ("clean latents", "latents + 0.05 jitter"):
        print(f"  {label}")
        for name, m in decoded[label].items():
            print(f"    {name:<22} {m['flicker']:.4f} {m['mean_abs_diff']:.4f} {m['change_vs_plain']:.4f} "
                  f"{m['distance_to_clean_decode']:.4f}")
    print("Temporal (SVD-layout) decoder, random tiny, first 32 frames: |chunked - full| / std, flicker")
    for name, m in decoded["temporal_vae_random"].items():
        extra = f"mean {m['mean_err_rel']:.4f} max {m['max_err_rel']:.4f} " if "mean_err_rel" in m else ""
        print(f"  {name:<22} {extra}flicker {m['flicker']:.4f}")

    if args.json:
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
