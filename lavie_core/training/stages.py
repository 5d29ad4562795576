"""The training stages of the tiny cascade, each resumable from the files it writes.

Order (LaVie's recipe at toy scale): the two VAEs; a text-to-image model with the text encoder trained
jointly (`t2i`); temporal layers on videos with still images appended (`temporal`, joint image-video
fine-tuning); the interpolation model, initialised from the text-to-image weights; the VSR model. Every
stage trains on freshly rendered world scenes, reads its inputs from and writes its result to one work
folder (the bundle layout), and stops at a step or a wall-clock budget, whichever comes first.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..loading import load_unet, save_unet
from ..text import TextEncoder, load_text_encoder
from ..unet import LaVieUNet
from ..vae import AutoencoderKL, VAEConfig, encode_video, load_vae
from . import world
from .diffusion import add_noise, lavie_alphas_cumprod, low_res_alphas_cumprod, velocity
from .spec import CascadeSpec
from .text import build_text_model, write_tokenizer

BASE_UNCOND = ""
INTERPOLATION_UNCOND = "None"  # the official interpolation sampler's unconditional prompt
VSR_UNCONDS = ("", "blur, worst quality")  # the x4 upscaler's empty prompt and the official VSR negative prompt
INTERPOLATION_SUFFIX = ", 4k."  # the official interpolation sampler appends this to the prompt
TEXT_DROPOUT = 0.1

FILES = {
    "vae": "vae.safetensors",
    "vae_x4": "vae_x4.safetensors",
    "text": "text_encoder",
    "text_t2i": "text_encoder_t2i",  # the text encoder as the text-to-image stage left it; video stages start here
    "t2i": "base_t2i.safetensors",
    "base": "base.safetensors",
    "interpolation": "interpolation.safetensors",
    "vsr": "vsr.safetensors",
}


@dataclass
class Budget:
    """When a stage stops (step count or wall-clock seconds, whichever comes first) and how it steps."""

    steps: int
    seconds: float = math.inf
    batch: int = 8
    lr: float = 2e-4
    compile: bool = False  # torch.compile the UNet (falls back to eager if compiling fails)
    # Epsilon objectives: weight each sample's loss by 1/SNR clamped to [1, cap] (0 = plain MSE). An eps error
    # becomes an x0 error 1/sqrt(SNR) times larger, so this asks for the precision that high-noise steps need.
    eps_weight_cap: float = 0.0
    t_min: int = 0  # train on timesteps t_min..999 only
    # > 0: draw batches from this many pre-built ones (fresh noise and timesteps every step). Rendering and
    # VAE-encoding dominate a CPU step; a GPU regenerates every batch instead.
    pool: int = 0
    # Video stage with a trainable text encoder: weight of the caption read-out loss (see CaptionProbe).
    text_aux: float = 0.0

    def progress(self, step: int, elapsed: float) -> float:
        return max(step / max(self.steps, 1), elapsed / self.seconds if math.isfinite(self.seconds) else 0.0)


class Trainer:
    """AdamW with warm-up and cosine decay over the budget's progress, gradient clipping, an EMA copy per model
    and periodic saving. `step(loss)` returns False once the budget is spent."""

    def __init__(
        self,
        name: str,
        groups: list[dict],
        budget: Budget,
        log_dir: Path,
        ema: Iterable[tuple[nn.Module, nn.Module]] = (),
        save: Callable[[], None] | None = None,
        save_every: float = 90.0,
        ema_decay: float = 0.999,
        warmup: int = 100,
        start: float | None = None,
    ):
        self.name = name
        self.budget = budget
        self.params = [p for g in groups for p in g["params"]]
        for g in groups:
            g.setdefault("lr", budget.lr)
            g["base_lr"] = g["lr"]
        fused = all(p.is_cuda for p in self.params)
        self.opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=0.01, fused=fused or None)
        self.ema = [(list(m.parameters()), list(e.parameters())) for m, e in ema]
        self.ema_decay = ema_decay
        self.warmup = min(warmup, max(budget.steps // 10, 1))
        self.save = save
        self.save_every = save_every
        self.step_count = 0
        self.start = time.monotonic() if start is None else start
        self.last_save = self.start
        self.smooth: float | None = None
        self.window: torch.Tensor | None = None
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(log_dir / f"{name}.jsonl", "a")

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def step(self, loss: torch.Tensor) -> bool:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        progress = self.budget.progress(self.step_count, self.elapsed())
        scale = min(1.0, (self.step_count + 1) / self.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * scale
        self.opt.step()
        self.step_count += 1
        decay = min(self.ema_decay, (1 + self.step_count) / (10 + self.step_count))
        with torch.no_grad():
            for live, avg in self.ema:
                torch._foreach_lerp_(avg, live, 1 - decay)
        # Accumulated on the device: reading a loss every step would stall the CPU on the GPU.
        self.window = loss.detach() if self.window is None else self.window + loss.detach()
        if self.step_count % 50 == 0 or self.step_count == 1:
            value = float(self.window) / (1 if self.step_count == 1 else 50)
            self.window = None
            self.smooth = value if self.smooth is None else 0.7 * self.smooth + 0.3 * value
            self.record(loss=value, smooth=self.smooth, lr=self.opt.param_groups[0]["lr"])
        now = time.monotonic()
        if self.save is not None and now - self.last_save > self.save_every:
            self.save()
            self.last_save = now
        return self.budget.progress(self.step_count, self.elapsed()) < 1.0

    def record(self, **fields) -> None:
        entry = {"stage": self.name, "step": self.step_count, "seconds": round(self.elapsed(), 1), **fields}
        line = json.dumps(entry)
        self.log.write(line + "\n")
        self.log.flush()
        print(line, flush=True)

    def finish(self, log_dir: Path, **fields) -> dict:
        if self.save is not None:
            self.save()
        summary = {"stage": self.name, "steps": self.step_count, "seconds": round(self.elapsed(), 1),
                   "final_loss": self.smooth, **fields}
        (log_dir / f"{self.name}.done.json").write_text(json.dumps(summary, indent=2))
        self.log.close()
        return summary


def eps_loss(pred: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, table: torch.Tensor, cap: float) -> torch.Tensor:
    if not cap:
        return F.mse_loss(pred.float(), noise)
    a = table[t]
    weight = ((1 - a) / a).clamp(1.0, cap)
    per_sample = (pred.float() - noise).pow(2).flatten(1).mean(dim=1)
    return (weight * per_sample).mean() / weight.mean()


def eps_objective(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor, table: torch.Tensor,
                  budget: Budget, device: torch.device) -> torch.Tensor:
    """The epsilon objective of every epsilon-prediction stage: `x0` noised at timesteps drawn from
    `budget.t_min`..999, the noise predicted by `predict(x_t, t)` under autocast, scored by `eps_loss`."""
    t = torch.randint(budget.t_min, len(table), (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    with _autocast(device):
        pred = predict(add_noise(table, x0, noise, t), t)
    return eps_loss(pred, noise, t, table, budget.eps_weight_cap)


def train_loop(trainer: Trainer, unet: nn.Module, batches: Callable[[], dict], loss_fn: Callable[[nn.Module, dict], torch.Tensor]) -> None:
    """Step until the budget is spent; with `budget.compile`, the UNet runs compiled if a first step compiles."""
    net = unet
    if trainer.budget.pool:
        made = [batches() for _ in range(trainer.budget.pool)]
        pick = torch.Generator().manual_seed(len(made))
        batches = lambda: made[int(torch.randint(len(made), (1,), generator=pick))]  # noqa: E731
    if trainer.budget.compile:
        compiled = torch.compile(unet)
        try:
            loss_fn(compiled, batches()).backward()
            net = compiled
        except Exception as e:  # any compiler failure: training still proceeds, only slower
            trainer.record(compile_failed=f"{type(e).__name__}: {str(e)[:300]}")
        unet.zero_grad(set_to_none=True)
        trainer.record(compiled=net is compiled)
    while trainer.step(loss_fn(net, batches())):
        pass


def _ema_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval().requires_grad_(False)


def _generator(seed: int, stage: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000 + sum(map(ord, stage)))


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


# ---------------------------------------------------------------------------------------------------
# Saving and loading


def fold_latent_scale(vae: AutoencoderKL, factor: float) -> None:
    """Multiply the latent space by `factor` without changing what the VAE computes end to end.

    The posterior mean comes out of `quant_conv` and the decoder starts with `post_quant_conv`, both 1x1
    convolutions, so the scale folds into their weights (and the log-variance shifts by 2 log factor).
    """
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[:c] *= factor
        vae.quant_conv.bias[:c] *= factor
        vae.quant_conv.bias[c:] += 2 * math.log(factor)
        vae.post_quant_conv.weight /= factor


@torch.no_grad()
def latent_std(vae: AutoencoderKL, frames: torch.Tensor) -> float:
    mean, logvar = vae.encode(frames.to(vae.device, vae.dtype))
    return float((mean + torch.randn_like(mean) * (0.5 * logvar).exp()).float().std())


def save_vae(vae: AutoencoderKL, path: Path, std: float | None = None) -> None:
    """fp16 diffusers-layout weights, with the scaling factor (and the latent std measured before
    `normalise_vae`) in the metadata; `load_vae` itself infers the factor from the depth."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in vae.state_dict().items()}
    meta = {"scaling_factor": repr(vae.config.scaling_factor), "format": "pt"}
    if std is not None:
        meta["latent_std_before_scaling"] = repr(std)
    save_file(sd, str(path), metadata=meta)


def normalise_vae(vae: AutoencoderKL, frames: torch.Tensor) -> float:
    """Fold a scale into `vae` so that its latents times config.scaling_factor have unit std; returns the
    unit-std scaling factor the unfolded latents had (1 / std)."""
    std = latent_std(vae, frames)
    fold_latent_scale(vae, 1.0 / (vae.config.scaling_factor * std))
    return std


def save_text_encoder(text: TextEncoder, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text.model.save_pretrained(str(folder))
    text.tokenizer.save_pretrained(str(folder))


def new_text_encoder(spec: CascadeSpec, folder: Path, seed: int) -> TextEncoder:
    """A random tiny CLIP, written to `folder` and loaded back the way the pipeline loads it."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(folder, max_length=spec.text.max_length)
    torch.manual_seed(seed)
    build_text_model(vocab, spec.text).save_pretrained(str(folder))
    return load_text_encoder(folder)


class PromptEncoder:
    """Prompts -> text states. A frozen encoder's outputs are cached per prompt (the world has few)."""

    def __init__(self, text: TextEncoder, trainable: bool):
        self.text = text
        self.trainable = trainable
        self.cache: dict[str, torch.Tensor] = {}
        text.model.train(trainable).requires_grad_(trainable)

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if self.trainable:
            ids = self.text.tokenize(prompts).to(self.text.device)
            return self.text.model(input_ids=ids).last_hidden_state
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            for p, e in zip(missing, self.text.encode(missing)):
                self.cache[p] = e
        return torch.stack([self.cache[p] for p in prompts])


ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": world.SHAPE_COLOURS,
    "shape": world.SHAPES,
    "direction": tuple(world.DIRECTIONS),
    "background": world.BACKGROUNDS,
}


class CaptionProbe(nn.Module):
    """Linear read-out of every caption attribute from the mean text state.

    Trained with the text encoder, it keeps each attribute recoverable from the embeddings, the property
    a large pretrained encoder (CLIP) brings for free. Without it the tiny encoder lets words the denoising
    loss gives no early gradient to (motion directions) collapse together, and the UNet never learns them.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(dim, len(v)) for k, v in ATTRIBUTES.items()})

    @staticmethod
    def labels(combos: list[world.Combo], kept: list[bool]) -> torch.Tensor:
        """`[b, 4]` class indices; -100 (ignored) for captions replaced by the unconditional prompt."""
        return torch.tensor([[ATTRIBUTES[k].index(getattr(c, k)) if keep else -100 for k in ATTRIBUTES]
                             for c, keep in zip(combos, kept)])

    def forward(self, states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pooled = states.float().mean(dim=1)
        losses = [F.cross_entropy(head(pooled), labels[:, i], ignore_index=-100) for i, head in enumerate(self.heads.values())]
        return torch.stack(losses).nan_to_num().sum()  # nan when every caption of the batch was dropped


def drop_text(prompts: list[str], generator: torch.Generator, unconds: tuple[str, ...], p: float = TEXT_DROPOUT) -> list[str]:
    """Classifier-free guidance training: replace a fraction `p` of prompts by an unconditional prompt."""
    u = torch.rand(len(prompts), generator=generator).tolist()
    pick = torch.randint(len(unconds), (len(prompts),), generator=generator).tolist()
    return [unconds[k] if r < p else text for text, r, k in zip(prompts, u, pick)]


def temporal_parameter_names(model: LaVieUNet) -> set[str]:
    """Parameters that only act across frames: temporal attention, its norm and relative bias, and VSR's
    temporal convolutions and modules."""
    attr = model.config.temporal_attr
    keys = (f".attn_{attr}.", f".norm_{attr}.", "resblock_temporal", "temporal_blocks", "mid_temporal_block")
    return {n for n, _ in model.named_parameters() if any(k in f".{n}" for k in keys)}


def init_from_2d(target: LaVieUNet, source: LaVieUNet) -> int:
    """Copy the spatial (2-D) weights of `source` into `target` where names and shapes agree; the first
    convolution's extra input channels start at zero, as the official interpolation model's did. Returns
    how many tensors were copied."""
    skip = temporal_parameter_names(target)
    src = source.state_dict()
    copied = 0
    with torch.no_grad():
        for name, tensor in target.state_dict().items():
            if name in skip or name not in src or name.endswith("rotary_emb.freqs"):
                continue
            value = src[name]
            if value.shape == tensor.shape:
                tensor.copy_(value)
                copied += 1
            elif name == "conv_in.weight" and value.shape[1] < tensor.shape[1] and value.shape[0] == tensor.shape[0]:
                tensor.zero_()
                tensor[:, : value.shape[1]] = value
                copied += 1
    return copied


def _load_or_new_unet(path: Path, make: Callable[[], LaVieUNet], device: torch.device) -> LaVieUNet:
    model = load_unet(path, device=device) if path.is_file() else make().to(device)
    return model.train().requires_grad_(True)


def _frozen_vae(path: Path, device: torch.device) -> AutoencoderKL:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: train the VAE stage first")
    return load_vae(path, device=device)


def _random_times(n: int, count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, count, generator=generator) * (world.REF_FRAMES - 1)


# ---------------------------------------------------------------------------------------------------
# Stages


def train_vae(spec: CascadeSpec, which: str, work: Path, budget: Budget, device: torch.device, seed: int = 0,
              kl_weight: float = 1e-4) -> dict:
    """An AutoencoderKL on single world frames: L1 + MSE reconstruction plus a small KL term. At the end
    the latent scale is folded in so that the preset scaling_factor gives unit-variance latents."""
    config: VAEConfig = spec.vae if which == "vae" else spec.vae_x4
    size = spec.size if which == "vae" else spec.vsr_size
    path = work / FILES[which]
    vae = (load_vae(path, device=device) if path.is_file() else AutoencoderKL(config).to(device)).train().requires_grad_(True)
    gen = _generator(seed, which)
    torch.manual_seed(seed)
    ema = _ema_copy(vae)
    logs = work / "logs"
    probe_gen = _generator(seed + 1, which)
    scenes = world.sample_scenes(min(256, 16 * budget.batch), probe_gen).to(device)
    probe = world.render(scenes, _random_times(len(scenes), 1, probe_gen), size)[:, :, 0]
    measured: dict[str, float] = {}

    def save() -> None:
        # The EMA weights are saved; the scale fold goes into a copy so that training continues unchanged.
        normalised = _ema_copy(ema)
        measured["latent_std"] = normalise_vae(normalised, probe)
        save_vae(normalised, path, measured["latent_std"])

    trainer = Trainer(which, [{"params": list(vae.parameters())}], budget, logs, ema=[(vae, ema)], save=save, warmup=50)
    while True:
        scenes = world.sample_scenes(budget.batch, gen).to(device)
        frames = world.render(scenes, _random_times(budget.batch, 1, gen), size)[:, :, 0]
        with _autocast(device):
            mean, logvar = vae.encode(frames)
            z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
            rec = vae.decode(z).float()
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).mean()
        loss = (rec - frames).abs().mean() + F.mse_loss(rec, frames) + kl_weight * kl
        if not trainer.step(loss):
            break
    with torch.no_grad():
        psnr = _psnr(ema.decode(ema.encode(probe)[0]), probe)
    summary = trainer.finish(logs, psnr_db=psnr)
    summary.update(measured)
    (logs / f"{which}.done.json").write_text(json.dumps(summary, indent=2))
    return summary


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.float().clamp(-1, 1), b.float()).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def train_t2i(spec: CascadeSpec, work: Path, budget: Budget, device: torch.device, seed: int = 0,
              train_text: bool = True, name: str = "t2i", out: str = FILES["t2i"], text_dir: str = FILES["text"],
              text_lr: float | None = None) -> dict:
    """Text-to-image pretraining of the base UNet on single frames (temporal layers bypassed), with the text
    encoder trained jointly (`train_text`) or frozen at its random initialisation."""
    start = time.monotonic()
    vae = _frozen_vae(work / FILES["vae"], device)
    (work / out).parent.mkdir(parents=True, exist_ok=True)
    unet = _load_or_new_unet(work / out, lambda: LaVieUNet(spec.base), device)
    text_path = work / text_dir
    text = load_text_encoder(text_path, device=device) if text_path.is_dir() else new_text_encoder(spec, text_path, seed).to(device)
    prompts = PromptEncoder(text, trainable=train_text)
    temporal = temporal_parameter_names(unet)
    groups = [{"params": [p for n, p in unet.named_parameters() if n not in temporal]}]
    ema = [(unet, _ema_copy(unet))]
    if train_text:
        groups.append({"params": list(text.model.parameters()), "lr": text_lr or budget.lr})
        ema.append((text.model, _ema_copy(text.model)))
    ema_unet = ema[0][1]

    def save() -> None:
        save_unet(ema_unet, work / out, dtype=torch.float16)
        if train_text:
            encoder = TextEncoder(text.tokenizer, ema[1][1])
            save_text_encoder(encoder, text_path)
            if text_dir == FILES["text"]:
                save_text_encoder(encoder, work / FILES["text_t2i"])

    gen = _generator(seed, name)
    torch.manual_seed(seed)
    table = lavie_alphas_cumprod().to(device)
    trainer = Trainer(name, groups, budget, work / "logs", ema=ema, save=save, start=start)
    b = budget.batch

    def batches() -> dict:
        scenes = world.sample_scenes(b, gen)
        video = world.render(scenes.to(device), _random_times(b, 1, gen), spec.size)
        return {"x0": encode_video(vae, video, chunk=b), "prompts": drop_text(scenes.captions, gen, (BASE_UNCOND,))}

    def loss_fn(net: nn.Module, batch: dict) -> torch.Tensor:
        with _autocast(device):
            context = prompts(batch["prompts"])
        return eps_objective(lambda x, t: net(x, t, context, image_frames=1), batch["x0"], table, budget, device)

    train_loop(trainer, unet, batches, loss_fn)
    return trainer.finish(work / "logs", train_text=train_text)


def _text_source(work: Path, out: str, text_out: str) -> Path:
    """The encoder a video stage continues from: its own when resuming, else the text-to-image stage's
    snapshot (never a file another stage may be rewriting), else the shared one of an older work folder."""
    if (work / out).is_file() and (work / text_out).is_dir():
        return work / text_out
    if (work / FILES["text_t2i"]).is_dir():
        return work / FILES["text_t2i"]
    return work / FILES["text"]


def train_temporal(spec: CascadeSpec, work: Path, budget: Budget, device: torch.device, seed: int = 0,
                   joint: bool = True, name: str = "temporal", init: str = FILES["t2i"], out: str = FILES["base"],
                   freeze_spatial: bool = False, spatial_lr_scale: float = 1.0, train_text: bool = True,
                   text_out: str = FILES["text"]) -> dict:
    """Video fine-tuning of the base model. `joint`: each clip carries `spec.image_frames` still images of
    the same caption, which skip temporal attention (LaVie's joint image-video fine-tuning); otherwise
    videos only. Spatial layers train at `spatial_lr_scale` times the rate, or not at all (`freeze_spatial`).
    The text encoder trains too (`train_text`, saved to `text_out`): motion words carry no signal in still
    images, so the encoder the text-to-image stage leaves behind has learned to ignore them (measured: the
    embeddings of captions differing only in direction were 10x closer than of captions differing in
    colour, and direction adherence was at chance). A run starts from that stage's encoder, or resumes its
    own pair of files."""
    start = time.monotonic()
    vae = _frozen_vae(work / FILES["vae"], device)
    source = work / out if (work / out).is_file() else work / init
    if not source.is_file():
        raise FileNotFoundError(f"{source}: train the text-to-image stage first")
    (work / out).parent.mkdir(parents=True, exist_ok=True)
    unet = load_unet(source, device=device).train().requires_grad_(True)
    text = load_text_encoder(_text_source(work, out, text_out), device=device)
    prompts = PromptEncoder(text, trainable=train_text)
    temporal = temporal_parameter_names(unet)
    if freeze_spatial:
        for n, p in unet.named_parameters():
            p.requires_grad_(n in temporal)
        groups = [{"params": [p for n, p in unet.named_parameters() if n in temporal]}]
    else:
        groups = [
            {"params": [p for n, p in unet.named_parameters() if n in temporal]},
            {"params": [p for n, p in unet.named_parameters() if n not in temporal], "lr": budget.lr * spatial_lr_scale},
        ]
    ema = _ema_copy(unet)
    pairs = [(unet, ema)]
    probe = CaptionProbe(text.dim).to(device) if train_text and budget.text_aux else None
    if train_text:
        groups.append({"params": list(text.model.parameters())})
        pairs.append((text.model, _ema_copy(text.model)))
    if probe is not None:
        groups.append({"params": list(probe.parameters())})

    def save() -> None:
        save_unet(ema, work / out, dtype=torch.float16)
        if train_text:
            save_text_encoder(TextEncoder(text.tokenizer, pairs[1][1]), work / text_out)

    gen = _generator(seed, "temporal")  # both variants see the same videos
    torch.manual_seed(seed)
    table = lavie_alphas_cumprod().to(device)
    trainer = Trainer(name, groups, budget, work / "logs", ema=pairs, save=save, start=start)
    b, k = budget.batch, spec.image_frames if joint else 0
    times = world.base_times(spec.frames)

    def batches() -> dict:
        scenes = world.sample_scenes(b, gen)
        x0 = encode_video(vae, world.render(scenes.to(device), times, spec.size), chunk=b * spec.frames)
        if k:
            stills = world.scenes_for([c for c in scenes.combos for _ in range(k)], gen).to(device)
            images = world.render(stills, _random_times(b * k, 1, gen), spec.size)
            latents = encode_video(vae, images, chunk=b * k)  # (b k) c 1 h w
            x0 = torch.cat([x0, latents.reshape(b, k, *latents.shape[1:]).squeeze(3).transpose(1, 2)], dim=2)
        captions = drop_text(scenes.captions, gen, (BASE_UNCOND,))
        labels = CaptionProbe.labels(scenes.combos, [a == c for a, c in zip(captions, scenes.captions)])
        return {"x0": x0, "prompts": captions, "labels": labels.to(device)}

    def loss_fn(net: nn.Module, batch: dict) -> torch.Tensor:
        with _autocast(device):
            context = prompts(batch["prompts"])
        loss = eps_objective(lambda x, t: net(x, t, context, image_frames=k), batch["x0"], table, budget, device)
        if probe is not None:
            loss = loss + budget.text_aux * probe(context, batch["labels"])
        return loss

    train_loop(trainer, unet, batches, loss_fn)
    return trainer.finish(work / "logs", joint=joint, freeze_spatial=freeze_spatial, train_text=train_text)


def interpolation_sources(frames: int, factor: int = 4) -> list[int]:
    """For each of the factor * (frames - 1) + 1 output positions, the base frame its conditioning copies."""
    try:
        from ..pipeline import interpolation_layout  # type: ignore[attr-defined]

        return [int(i) for i in interpolation_layout(frames)]
    except ImportError:
        return [(p + 1) // factor for p in range(factor * (frames - 1) + 1)]


def train_interpolation(spec: CascadeSpec, work: Path, budget: Budget, device: torch.device, seed: int = 0,
                        name: str = "interpolation", init: str = FILES["t2i"]) -> dict:
    """The n -> 4n-3 model: targets are the scene rendered at four times the frame rate; conditioning is
    the latents of the n base frames laid out as the official sampler does; all frames are regenerated."""
    start = time.monotonic()
    vae = _frozen_vae(work / FILES["vae"], device)
    path = work / FILES["interpolation"]

    def make() -> LaVieUNet:
        model = LaVieUNet(spec.interpolation)
        if (work / init).is_file():
            init_from_2d(model, load_unet(work / init))
        return model

    unet = _load_or_new_unet(path, make, device)
    prompts = PromptEncoder(load_text_encoder(work / FILES["text"], device=device), trainable=False)
    ema = _ema_copy(unet)
    gen = _generator(seed, name)
    torch.manual_seed(seed)
    table = lavie_alphas_cumprod().to(device)
    trainer = Trainer(name, [{"params": list(unet.parameters())}], budget, work / "logs", ema=[(unet, ema)],
                      save=lambda: save_unet(ema, path, dtype=torch.float16), start=start)
    b = budget.batch
    times = world.interpolated_times(spec.frames, spec.factor)
    keys = torch.tensor([spec.factor * s for s in interpolation_sources(spec.frames, spec.factor)], device=device)

    def batches() -> dict:
        scenes = world.sample_scenes(b, gen)
        x0 = encode_video(vae, world.render(scenes.to(device), times, spec.size), chunk=b * len(times))
        suffix = torch.rand(b, generator=gen).tolist()
        captions = [c + INTERPOLATION_SUFFIX if r < 0.5 else c for c, r in zip(scenes.captions, suffix)]
        return {"x0": x0, "prompts": drop_text(captions, gen, (INTERPOLATION_UNCOND,))}

    def loss_fn(net: nn.Module, batch: dict) -> torch.Tensor:
        x0 = batch["x0"]
        with _autocast(device):
            context = prompts(batch["prompts"])
        return eps_objective(lambda x, t: net(torch.cat([x, x0[:, :, keys]], dim=1), t, context), x0, table, budget, device)

    train_loop(trainer, unet, batches, loss_fn)
    return trainer.finish(work / "logs")


def vsr_times(n: int, chunk: int, frames: int, generator: torch.Generator) -> torch.Tensor:
    """Times of `n` clips of `chunk` frames, half at the base frame rate and half at the interpolated one
    (VSR upscales either), each starting at a random point of the scene."""
    spacing = (world.REF_FRAMES - 1) / (frames - 1)
    step = torch.where(torch.rand(n, generator=generator) < 0.5, spacing, spacing / 4)
    start = torch.rand(n, generator=generator) * ((world.REF_FRAMES - 1) - step * (chunk - 1))
    return start[:, None] + step[:, None] * torch.arange(chunk)


@torch.no_grad()
def degrade_like_base(vae: AutoencoderKL, video: torch.Tensor) -> torch.Tensor:
    """A low-res video as the base cascade delivers it: through the x8 VAE and back."""
    b = video.shape[0]
    frames = video.transpose(1, 2).flatten(0, 1)
    rec = vae.decode(vae.encode(frames.to(vae.dtype))[0]).float().clamp(-1, 1)
    return rec.unflatten(0, (b, -1)).transpose(1, 2)


def train_vsr(spec: CascadeSpec, work: Path, budget: Budget, device: torch.device, seed: int = 0,
              name: str = "vsr") -> dict:
    """The x4 video upscaler: v-prediction of x4-VAE latents of the high-res video, given the low-res
    video concatenated on channels with noise augmentation at a random level (the UNet's class label).
    Half of the low-res inputs pass through the x8 VAE first, like the base model's decoded output."""
    start = time.monotonic()
    vae_x4 = _frozen_vae(work / FILES["vae_x4"], device)
    vae = _frozen_vae(work / FILES["vae"], device)
    path = work / FILES["vsr"]
    unet = _load_or_new_unet(path, lambda: LaVieUNet(spec.vsr), device)
    prompts = PromptEncoder(load_text_encoder(work / FILES["text"], device=device), trainable=False)
    ema = _ema_copy(unet)
    gen = _generator(seed, name)
    torch.manual_seed(seed)
    table = lavie_alphas_cumprod().to(device)
    low = low_res_alphas_cumprod().to(device)
    trainer = Trainer(name, [{"params": list(unet.parameters())}], budget, work / "logs", ema=[(unet, ema)],
                      save=lambda: save_unet(ema, path, dtype=torch.float16), start=start)
    b, n = budget.batch, spec.vsr_chunk
    max_level = int(spec.vsr.max_noise_level)

    def batches() -> dict:
        scenes = world.sample_scenes(b, gen)
        hr = world.render(scenes.to(device), vsr_times(b, n, spec.frames, gen), spec.vsr_size)
        lr = world.downsample(hr, spec.vsr_scale)
        through_vae = (torch.rand(b, generator=gen) < 0.5).to(device)
        lr = torch.where(through_vae[:, None, None, None, None], degrade_like_base(vae, lr), lr)
        level = torch.randint(0, max_level + 1, (b,), device=device)
        return {
            "x0": encode_video(vae_x4, hr, chunk=b * n),
            "lr": add_noise(low, lr, torch.randn_like(lr), level),
            "level": level,
            "prompts": drop_text(scenes.captions, gen, VSR_UNCONDS),
        }

    def loss_fn(net: nn.Module, batch: dict) -> torch.Tensor:
        x0 = batch["x0"]
        with _autocast(device):
            context = prompts(batch["prompts"])
            t = torch.randint(0, len(table), (b,), device=device)
            noise = torch.randn_like(x0)
            pred = net(torch.cat([add_noise(table, x0, noise, t), batch["lr"]], dim=1), t, context, batch["level"])
        return F.mse_loss(pred.float(), velocity(table, x0, noise, t))

    train_loop(trainer, unet, batches, loss_fn)
    return trainer.finish(work / "logs")


STAGES: dict[str, Callable[..., dict]] = {
    "vae": lambda spec, work, budget, device, seed: train_vae(spec, "vae", work, budget, device, seed),
    "vae_x4": lambda spec, work, budget, device, seed: train_vae(spec, "vae_x4", work, budget, device, seed),
    "t2i": train_t2i,
    "temporal": train_temporal,
    "interpolation": train_interpolation,
    "vsr": train_vsr,
    # Ablations: the text encoder kept at its random initialisation; video-only fine-tuning.
    "t2i_frozen_text": lambda spec, work, budget, device, seed: train_t2i(
        spec, work, budget, device, seed, train_text=False, name="t2i_frozen_text",
        out="ablation/base_t2i_frozen_text.safetensors", text_dir="ablation/text_encoder_random"),
    # Ablation twins from the text-to-image checkpoint, same budget and videos: joint image-video vs
    # video-only fine-tuning, each with its own copy of the text encoder.
    "temporal_joint": lambda spec, work, budget, device, seed: train_temporal(
        spec, work, budget, device, seed, name="temporal_joint", init=FILES["t2i"],
        out="ablation/base_joint.safetensors", text_out="ablation/text_encoder_joint"),
    "temporal_video_only": lambda spec, work, budget, device, seed: train_temporal(
        spec, work, budget, device, seed, joint=False, name="temporal_video_only", init=FILES["t2i"],
        out="ablation/base_video_only.safetensors", text_out="ablation/text_encoder_video_only"),
}

DEPENDS: dict[str, tuple[str, ...]] = {
    "vae": (),
    "vae_x4": (),
    "t2i": ("vae",),
    "t2i_frozen_text": ("vae",),
    "temporal": ("t2i",),
    "temporal_joint": ("t2i",),
    "temporal_video_only": ("t2i",),
    "interpolation": ("t2i",),
    "vsr": ("vae", "vae_x4", "t2i"),
}
