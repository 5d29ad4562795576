"""Quality of a LaVie cascade on the synthetic world, against its exact ground truth.

    python bench/quality.py --bundle bundled/lavie-tiny --device cuda    # everything, under a minute
    python bench/quality.py --bundle bundled/lavie-tiny --sections vae,t2v,interpolation  # CPU, ~10 minutes
    python bench/quality.py --bundle bundled/lavie-tiny --device cuda --seeds 4 --json metrics.json
    python bench/quality.py --bundle bundled/lavie-tiny --ablation DIR   # + the two ablations

Sections (each prints a table; --json writes every number):
- vae: reconstruction PSNR of both VAEs and the detector's accuracy on round-tripped ground truth (the
  ceiling any generated video can reach).
- t2v: text_to_video on the held-out prompts (and as many training prompts): colour / shape / direction /
  background recovered by the world's detector; temporal consistency (mean absolute frame difference and
  its second difference, the centroid's deviation from a straight constant-speed path, shape-area
  variation) next to the same numbers for ground-truth renders of the same prompts.
- interpolation: 16 ground-truth frames (encoded) -> 61, PSNR against the scene rendered at 4x frame rate,
  over all frames and over the in-between ones, per sampler, with frame-repeat and linear-blend baselines.
- vsr (tens of minutes on a CPU): ground truth downsampled x4 -> upscale -> PSNR/SSIM against the
  256x256 render, with bicubic and VAE round-trip references; also from a low-res input that went
  through the x8 VAE (as base output does).
- cascade: the held-out prompts through base -> interpolation -> VSR with the shipped workflow's samplers
  at the demo's 20 steps; adherence after each stage.
- ablation (with --ablation DIR, the folder of tools/train_bundled.py's work/pack output): joint
  image-video vs video-only fine-tuning (t2v metrics of twins trained side by side from the same
  text-to-image checkpoint, each with its own text encoder), and text encoder trained jointly vs kept at
  its random initialisation (single-frame text-to-image adherence of both T2I checkpoints).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lavie_core import load_unet, pipeline  # noqa: E402
from lavie_core.text import TextEncoder, load_text_encoder  # noqa: E402
from lavie_core.training import world  # noqa: E402
from lavie_core.training.stages import INTERPOLATION_UNCOND, VSR_UNCONDS  # noqa: E402
from lavie_core.vae import AutoencoderKL, decode_video, encode_video, load_vae  # noqa: E402

FIELDS = ("colour", "shape", "direction", "background", "all")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """dB, for videos in [-1, 1]."""
    mse = F.mse_loss(a.float().clamp(-1, 1), b.float()).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM (Gaussian window 11, sigma 1.5, per channel) of `[B, 3, T, H, W]` videos in [-1, 1]."""
    x = ((a.float().clamp(-1, 1) + 1) / 2).transpose(1, 2).flatten(0, 1)
    y = ((b.float().clamp(-1, 1) + 1) / 2).transpose(1, 2).flatten(0, 1)
    g = torch.exp(-((torch.arange(11, dtype=torch.float32) - 5) ** 2) / (2 * 1.5**2))
    g = (g / g.sum()).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(value.mean())


def adherence(videos: torch.Tensor, combos: list[world.Combo]) -> dict[str, float]:
    hits = {k: 0 for k in FIELDS}
    for video, combo in zip(videos, combos):
        for k, v in world.detect(video).matches(combo).items():
            hits[k] += int(v)
    return {k: hits[k] / len(combos) for k in FIELDS}


def consistency(videos: torch.Tensor) -> dict[str, float]:
    """Frame-to-frame statistics of `[B, 3, T, H, W]` videos in [-1, 1] (pixel values on a 0..1 scale)."""
    v = (videos.float().clamp(-1, 1) + 1) / 2
    d1 = (v[:, :, 1:] - v[:, :, :-1]).abs().mean().item()
    d2 = (v[:, :, 2:] - 2 * v[:, :, 1:-1] + v[:, :, :-2]).abs().mean().item()
    path, area = [], []
    for video in videos:
        det = world.detect(video)
        keep = det.visible
        if int(keep.sum()) < 3:
            continue
        t = keep.nonzero().squeeze(1).float()
        c = det.centroid[keep]
        design = torch.stack([torch.ones_like(t), t], dim=1)
        fit = torch.linalg.lstsq(design, c).solution
        path.append(float((c - design @ fit).norm(dim=1).mean()))
        a = det.area[keep]
        area.append(float(a.std() / a.mean()))
    return {
        "frame_diff": d1,
        "frame_diff2": d2,
        "path_dev_px": sum(path) / max(len(path), 1),
        "area_cv": sum(area) / max(len(area), 1),
        "tracked": len(path) / len(videos),
    }


class Bundle:
    def __init__(self, folder: Path, device: torch.device):
        self.folder = folder
        self.device = device
        self.vae = load_vae(folder / "vae.safetensors", device=device)
        self.vae_x4 = load_vae(folder / "vae_x4.safetensors", device=device)
        self.text = load_text_encoder(folder / "text_encoder", device=device)
        self.base = load_unet(folder / "base.safetensors", device=device)
        self.interpolation = load_unet(folder / "interpolation.safetensors", device=device)
        self.vsr = load_unet(folder / "vsr.safetensors", device=device)
        self.size = 64


def _decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Decoded video in [-1, 1], on the CPU like every tensor the metrics compare."""
    return decode_video(vae, latents, chunk=64).clamp(-1, 1)


def generate(unet, text: TextEncoder, vae: AutoencoderKL, combos: list[world.Combo], args, seed: int, frames: int = 16) -> torch.Tensor:
    """Decoded base videos, one per combo, in batches."""
    out = []
    for i in range(0, len(combos), args.batch):
        part = combos[i : i + args.batch]
        context = text.encode([c.caption for c in part]).float()
        uncond = text.encode([""] * len(part)).float()
        latents = pipeline.text_to_video(
            unet, context, uncond, frames=frames, height=64, width=64, steps=args.steps, cfg=args.cfg,
            sampler=args.sampler, seed=seed + i, batch=len(part), device=unet.device,
        )
        out.append(_decode(vae, latents.to(vae.device)).cpu())
    return torch.cat(out)


def prompt_sets(args) -> dict[str, list[world.Combo]]:
    held = world.HELD_OUT_COMBOS
    train = world.TRAIN_COMBOS[:: max(1, len(world.TRAIN_COMBOS) // len(held))][: len(held)]
    sets = {k: v for k, v in {"heldout": held, "train": train}.items() if k in args.sets.split(",")}
    if args.quick:
        sets = {k: v[: args.quick] for k, v in sets.items()}
    return sets


def section_vae(b: Bundle, args) -> dict:
    g = torch.Generator().manual_seed(11)
    scenes = world.sample_scenes(args.videos, g, split="heldout")
    gt = world.render(scenes.to(b.device), world.base_times(), 64)
    rt = _decode(b.vae, encode_video(b.vae, gt, chunk=256))
    hr = world.render(scenes.to(b.device), world.base_times()[:4], 256)
    rt4 = _decode(b.vae_x4, encode_video(b.vae_x4, hr, chunk=32))
    gt, hr = gt.cpu(), hr.cpu()
    return {
        "vae_x8_psnr": psnr(rt, gt),
        "vae_x4_psnr": psnr(rt4, hr),
        "vae_x4_ssim": ssim(rt4, hr),
        "detector_on_gt": adherence(gt, scenes.combos),
        "detector_on_vae_roundtrip": adherence(rt, scenes.combos),
    }


def section_t2v(unet, text: TextEncoder, vae: AutoencoderKL, args) -> dict:
    result = {}
    g = torch.Generator().manual_seed(12)
    for name, combos in prompt_sets(args).items():
        rates, cons = [], []
        for seed in range(args.seeds):
            videos = generate(unet, text, vae, combos, args, seed=1000 * seed)
            rates.append(adherence(videos, combos))
            cons.append(consistency(videos))
        result[name] = {
            "prompts": len(combos),
            "samples": len(combos) * args.seeds,
            **{k: sum(r[k] for r in rates) / len(rates) for k in FIELDS},
            "consistency": {k: sum(c[k] for c in cons) / len(cons) for k in cons[0]},
        }
        truth = world.render(world.scenes_for(combos, g), world.base_times(), 64)
        result[name]["consistency_ground_truth"] = consistency(truth)
    return result


def section_interpolation(b: Bundle, args) -> dict:
    g = torch.Generator().manual_seed(13)
    n = args.videos
    scenes = world.sample_scenes(n, g, split="heldout").to(b.device)
    keys = world.render(scenes, world.base_times(), 64)
    truth = world.render(scenes, world.interpolated_times(), 64).cpu()
    latents = encode_video(b.vae, keys, chunk=256, generator=torch.Generator(b.device).manual_seed(0))
    context = b.text.encode([c.caption for c in scenes.combos]).float()
    uncond = b.text.encode([INTERPOLATION_UNCOND] * n).float()
    videos = {}
    for sampler in args.interpolation_samplers.split(","):
        out = pipeline.interpolate(b.interpolation, latents, context, uncond, steps=args.steps, cfg=args.cfg_interpolation,
                                   sampler=sampler, seed=1, device=b.device)
        videos[f"model_{sampler}"] = _decode(b.vae, out.to(b.device))
    layout = pipeline.interpolation_layout(16)
    between = [p for p in range(len(layout)) if p % 4]
    decoded_keys = _decode(b.vae, latents)
    repeat = decoded_keys[:, :, layout]
    # Linear blend of the two decoded key frames around each position.
    t = world.interpolated_times()
    lo = t.floor().long().clamp(max=14)
    w = (t - lo)[None, None, :, None, None]
    blend = decoded_keys[:, :, lo] * (1 - w) + decoded_keys[:, :, lo + 1] * w
    ceiling = _decode(b.vae, encode_video(b.vae, truth.to(b.device), chunk=256))
    res = {"videos": n, "frames": truth.shape[2]}
    for name, v in (*videos.items(), ("repeat", repeat), ("linear_blend", blend), ("vae_roundtrip", ceiling)):
        res[f"{name}_psnr_all"] = psnr(v, truth)
        res[f"{name}_psnr_between"] = psnr(v[:, :, between], truth[:, :, between])
        # Per clip too: a few failed clips dominate the pooled figure.
        clips = sorted(psnr(v[i : i + 1], truth[i : i + 1]) for i in range(n))
        res[f"{name}_psnr_clip_median"] = clips[n // 2] if n % 2 else (clips[n // 2 - 1] + clips[n // 2]) / 2
        res[f"{name}_clips_below_20db"] = sum(c < 20 for c in clips)
    for name, v in videos.items():
        res[f"{name}_consistency"] = consistency(v)
    res["truth_consistency"] = consistency(truth)
    return res


def section_vsr(b: Bundle, args) -> dict:
    g = torch.Generator().manual_seed(14)
    n = max(1, args.videos // 2)
    scenes = world.sample_scenes(n, g, split="heldout").to(b.device)
    hr = world.render(scenes, world.base_times(), 256)
    lr = world.downsample(hr, 4)
    from lavie_core.training.stages import degrade_like_base

    lr_vae = degrade_like_base(b.vae, lr)
    hr = hr.cpu()
    context = b.text.encode([c.caption for c in scenes.combos]).float()
    uncond = b.text.encode([VSR_UNCONDS[1]] * n).float()
    res = {"videos": n, "frames": hr.shape[2]}
    for name, low in (("clean_lr", lr), ("vae_lr", lr_vae)):
        latents = pipeline.upscale(b.vsr, low, context, uncond, steps=args.steps, cfg=args.cfg_vsr, noise_level=args.noise_level,
                                   seed=1, device=b.device, latent_device=b.device)
        video = _decode(b.vae_x4, latents.to(b.device))
        res[f"model_{name}_psnr"] = psnr(video, hr)
        res[f"model_{name}_ssim"] = ssim(video, hr)
        up = F.interpolate(low.cpu().transpose(1, 2).flatten(0, 1), scale_factor=4, mode="bicubic", align_corners=False)
        up = up.unflatten(0, (n, -1)).transpose(1, 2).clamp(-1, 1)
        res[f"bicubic_{name}_psnr"] = psnr(up, hr)
        res[f"bicubic_{name}_ssim"] = ssim(up, hr)
    rt = _decode(b.vae_x4, encode_video(b.vae_x4, hr.to(b.device), chunk=32))
    res["vae_x4_roundtrip_psnr"] = psnr(rt, hr)
    res["vae_x4_roundtrip_ssim"] = ssim(rt, hr)
    return res


def section_cascade(b: Bundle, args) -> dict:
    """Held-out prompts through the whole cascade with the shipped workflow's samplers; adherence read after
    each stage. VSR runs on every `--cascade-stride`-th interpolated frame to keep CPU runs short."""
    combos = list(world.HELD_OUT_COMBOS)
    if args.quick:
        combos = combos[: args.quick]
    steps, n = args.cascade_steps, len(combos)
    context = b.text.encode([c.caption for c in combos]).float()
    base = pipeline.text_to_video(b.base, context, b.text.encode([""] * n).float(), frames=16, height=64, width=64,
                                  steps=steps, cfg=args.cfg, sampler="ddpm", seed=400, batch=n, device=b.device)
    frames = pipeline.interpolate(b.interpolation, base, context, b.text.encode([INTERPOLATION_UNCOND] * n).float(),
                                  steps=steps, cfg=args.cfg_interpolation, sampler="ddpm", seed=400, device=b.device)
    low = _decode(b.vae, frames.to(b.device))
    low_res = low[:, :, :: args.cascade_stride]
    high = pipeline.upscale(b.vsr, low_res.to(b.device), context, b.text.encode([VSR_UNCONDS[1]] * n).float(),
                            steps=steps, cfg=args.cfg_vsr, noise_level=args.noise_level, seed=400, chunk_frames=8,
                            chunk_overlap=2, device=b.device, latent_device=b.device)
    stages = {"base": _decode(b.vae, base.to(b.device)), "interpolation": low, "vsr": _decode(b.vae_x4, high.to(b.device))}
    return {"prompts": n, "steps": steps, "vsr_frames": low_res.shape[2],
            **{name: adherence(video, combos) for name, video in stages.items()}}


def _ablation_dir(path: Path) -> Path:
    """A work folder as is, or a --pack folder with its tar files unpacked to a temporary one."""
    if (path / "ablation").is_dir():
        return path
    tmp = Path(tempfile.mkdtemp(prefix="lavie-ablation-"))
    for name in ("t2i.tar", "ablation_frozen_text.tar", "ablation_video.tar"):
        if (path / name).is_file():
            with tarfile.open(path / name) as tar:
                tar.extractall(tmp, filter="data")
    return tmp


def section_ablation(b: Bundle, args) -> dict:
    folder = _ablation_dir(Path(args.ablation))
    res: dict = {}
    # Joint image-video vs video-only fine-tuning: twins from the same text-to-image checkpoint, trained side
    # by side on the same videos for the same time, each with the text encoder it trained.
    twins = {
        "joint_image_video": ("base_joint.safetensors", "text_encoder_joint"),
        "video_only": ("base_video_only.safetensors", "text_encoder_video_only"),
    }
    for name, (unet_file, text_dir) in twins.items():
        unet_path, text_path = folder / "ablation" / unet_file, folder / "ablation" / text_dir
        if unet_path.is_file() and text_path.is_dir():
            res[name] = section_t2v(load_unet(unet_path, device=b.device), load_text_encoder(text_path, device=b.device),
                                    b.vae, args)
    pairs = {
        "text_trained": (folder / "base_t2i.safetensors", folder / "text_encoder_t2i"),
        "text_frozen_random": (folder / "ablation" / "base_t2i_frozen_text.safetensors", folder / "ablation" / "text_encoder_random"),
    }
    for name, (unet_path, text_path) in pairs.items():
        if not (unet_path.is_file() and text_path.is_dir()):
            continue
        unet = load_unet(unet_path, device=b.device)
        text = load_text_encoder(text_path, device=b.device)
        sets = {}
        for split, combos in prompt_sets(args).items():
            combos = combos * args.seeds
            images = generate(unet, text, b.vae, combos, args, seed=7, frames=1)
            rates = adherence(images, combos)
            sets[split] = {k: rates[k] for k in ("colour", "shape", "background")}
        res[name] = sets
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=str(ROOT / "bundled" / "lavie-tiny"))
    p.add_argument("--ablation", default=None, help="training work or pack folder holding the ablation checkpoints")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sections", default="vae,t2v,interpolation,vsr,cascade,ablation")
    p.add_argument("--seeds", type=int, default=1, help="samples per prompt")
    p.add_argument("--videos", type=int, default=8, help="ground-truth clips for the interpolation / VAE sections")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--cfg-interpolation", type=float, default=4.0)
    p.add_argument("--interpolation-samplers", default="ddpm,ddim",
                   help="each is reported; the shipped workflows use ddpm with the bundled model, ddim is the official")
    p.add_argument("--cfg-vsr", type=float, default=5.0)
    p.add_argument("--noise-level", type=int, default=50)
    p.add_argument("--cascade-steps", type=int, default=20, help="steps per stage in the cascade section (the demo's)")
    p.add_argument("--cascade-stride", type=int, default=4, help="VSR on every n-th interpolated frame (cascade)")
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--quick", type=int, default=0, help="use only this many prompts per set")
    p.add_argument("--sets", default="heldout,train", help="prompt sets for the t2v and ablation sections")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    bundle = Bundle(Path(args.bundle), device)
    sections = {
        "vae": lambda: section_vae(bundle, args),
        "t2v": lambda: section_t2v(bundle.base, bundle.text, bundle.vae, args),
        "interpolation": lambda: section_interpolation(bundle, args),
        "vsr": lambda: section_vsr(bundle, args),
        "cascade": lambda: section_cascade(bundle, args),
        "ablation": lambda: section_ablation(bundle, args) if args.ablation else {},
    }
    results = {"settings": {k: v for k, v in vars(args).items() if k != "json"}}
    for name in args.sections.split(","):
        start = time.monotonic()
        with torch.no_grad():
            results[name] = sections[name]()
        results[name + "_seconds"] = round(time.monotonic() - start, 1)
        print(f"== {name} ({results[name + '_seconds']} s)\n{json.dumps(results[name], indent=1)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
