"""A tiny CLIP text encoder for the synthetic world, built locally with no download.

The tokenizer is CLIP's byte-level BPE with a small vocabulary: every byte (so any prompt tokenises) plus
whole-word tokens for the world's words, reached through a chain of merges per word. It is written as
vocab.json + merges.txt, which `transformers.CLIPTokenizer` and `lavie_core.text.load_text_encoder` read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .world import BACKGROUNDS, DIRECTIONS, SHAPE_COLOURS, SHAPES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Caption words first; then the unconditional prompts of the official stages ("None" for interpolation,
# "blur, worst quality" for VSR) and the interpolation stage's ", 4k." suffix.
WORLD_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "moving", "on", "background", *SHAPE_COLOURS, *SHAPES, *DIRECTIONS, *BACKGROUNDS]
        + ["none", "blur", "worst", "quality", "4", "k", ",", "."]
    )
)


def byte_symbols() -> list[str]:
    """The printable stand-in CLIP's byte-level BPE uses for each of the 256 bytes, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    spare = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(spare)) for b in range(256)]


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's merge loop: repeatedly join every occurrence of the lowest-ranked adjacent pair."""
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:]) if (a, b) in ranks}
        if not pairs:
            break
        best = min(pairs, key=ranks.__getitem__)
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_vocab(words: tuple[str, ...] = WORLD_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) in which each of `words` becomes one token.

    Words are added in order; each one's merges go after all earlier ones, so they only join the pieces
    the earlier merges leave, and no earlier word's tokenisation changes.
    """
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    table = dict(zip(range(256), symbols))
    for word in words:
        chars = [table[b] for b in word.encode("utf-8")]
        pieces = _apply_bpe(chars[:-1] + [chars[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
                tokens.append(pair[0] + pair[1])
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def write_tokenizer(folder: str | Path, words: tuple[str, ...] = WORLD_WORDS, max_length: int = 77) -> dict[str, int]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "do_lower_case": True,
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2)
    )
    return vocab


@dataclass(frozen=True)
class TextSpec:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    max_length: int = 77


def build_text_model(vocab: dict[str, int], spec: TextSpec):
    """A randomly initialised `CLIPTextModel` over `vocab`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        max_position_embeddings=spec.max_length,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    return CLIPTextModel(config)
