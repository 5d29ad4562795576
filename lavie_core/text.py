"""CLIP text conditioning outside ComfyUI, as the official LaVie code computes it.

Prompts are tokenised to a fixed 77 tokens (padding "max_length", truncation) and the
embedding is the text model's `last_hidden_state` (final layer norm applied), with no
attention mask: CLIP's causal mask already keeps padding out of the real tokens. The same
loader serves SD v1-4's CLIP ViT-L/14 (768-d) and the x4 upscaler's OpenCLIP ViT-H tower
(1024-d), both stored as transformers `CLIPTextModel` folders.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["TextEncoder", "load_text_encoder", "resolve_text_encoder_dirs"]

DEFAULT_MAX_LENGTH = 77
_TOKENIZER_FILE_SETS = (("vocab.json", "merges.txt"), ("tokenizer.json",))
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class TextEncoder:
    """A CLIP tokenizer and text model pair; `encode` maps prompts to `[N, max_length, D]`."""

    def __init__(self, tokenizer, model: torch.nn.Module, *, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.model = model
        limit = int(model.config.max_position_embeddings)
        if max_length is None:
            max_length = getattr(tokenizer, "model_max_length", None)
            # transformers reports an unset limit as a huge sentinel integer
            if not isinstance(max_length, int) or max_length > limit:
                max_length = min(DEFAULT_MAX_LENGTH, limit)
        self.max_length = int(max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        self.model.to(device=device, dtype=dtype)
        return self

    def tokenize(self, prompts: str | Sequence[str]) -> Tensor:
        """Token ids `[N, max_length]` (int64, CPU)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def encode(self, prompts: str | Sequence[str]) -> Tensor:
        """Prompts -> `last_hidden_state` `[N, max_length, D]` on the model's device and dtype."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            return torch.empty(0, self.max_length, self.dim, device=self.device, dtype=self.dtype)
        ids = self.tokenize(prompts).to(self.device)
        with torch.no_grad():
            return self.model(input_ids=ids).last_hidden_state

    __call__ = encode


def _has_tokenizer(folder: Path) -> bool:
    return any(all((folder / name).is_file() for name in files) for files in _TOKENIZER_FILE_SETS)


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _WEIGHT_FILES)


def resolve_text_encoder_dirs(path_or_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(tokenizer folder, text model folder) for a diffusers pipeline folder or a single folder with both.

    Raises FileNotFoundError naming the path and every missing piece.
    """
    root = Path(path_or_dir)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"text encoder path {root} {what}; expected a folder with tokenizer/ and text_encoder/")
    tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
    enc_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
    missing = []
    if not _has_tokenizer(tok_dir):
        missing.append(f"tokenizer files (vocab.json + merges.txt, or tokenizer.json) in {tok_dir}")
    if not (enc_dir / "config.json").is_file():
        missing.append(f"text model config.json in {enc_dir}")
    if not _has_weights(enc_dir):
        missing.append(f"text model weights ({' or '.join(_WEIGHT_FILES)}) in {enc_dir}")
    if missing:
        raise FileNotFoundError(f"{root}: not a CLIP text encoder folder; missing " + "; ".join(missing))
    return tok_dir, enc_dir


def load_text_encoder(
    path_or_dir: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_length: int | None = None,
) -> TextEncoder:
    """Loads a CLIP tokenizer + `CLIPTextModel` from local files only.

    Accepts a diffusers pipeline folder (`tokenizer/` and `text_encoder/` subfolders) or one
    folder holding both the tokenizer files and the model's config.json and weights.
    `max_length` defaults to the tokenizer's `model_max_length` (77 for CLIP).
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    tok_dir, enc_dir = resolve_text_encoder_dirs(path_or_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    model, info = CLIPTextModel.from_pretrained(
        str(enc_dir), local_files_only=True, dtype=dtype, output_loading_info=True
    )
    # transformers only logs missing weights and leaves them randomly initialised
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith("position_ids")]
    if missing:
        more = f", ... (+{len(missing) - 5})" if len(missing) > 5 else ""
        raise ValueError(
            f"{enc_dir}: weights do not fit CLIPTextModel({model.config.hidden_size}-d, "
            f"{model.config.num_hidden_layers} layers); missing {len(missing)}: {', '.join(missing[:5])}{more}"
        )
    model = model.to(device).eval().requires_grad_(False)
    return TextEncoder(tokenizer, model, max_length=max_length)
