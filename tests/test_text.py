import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from helpers import single_thread  # noqa: F401  (autouse: this module runs on one thread)
from lavie_core.text import TextEncoder, load_text_encoder

MERGES = [("a", "b"), ("ab", "c</w>"), ("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o</w>"), ("c", "a"), ("ca", "t</w>")]


def byte_chars() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for raw bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    shifted = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]


def write_tokenizer(folder, model_max_length: int | None = 77) -> dict[str, int]:
    folder.mkdir(parents=True, exist_ok=True)
    tokens = byte_chars() + [c + "</w>" for c in byte_chars()] + [a + b for a, b in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    config = {"tokenizer_class": "CLIPTokenizer", "do_lower_case": True}
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return vocab


def write_text_model(folder, vocab: dict[str, int]) -> None:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    CLIPTextModel(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    vocab = write_tokenizer(root / "tokenizer")
    write_text_model(root / "text_encoder", vocab)
    return root


@pytest.fixture(scope="module")
def encoder(pipeline_dir) -> TextEncoder:
    return load_text_encoder(pipeline_dir)


def test_shapes_and_dtype(encoder):
    emb = encoder.encode(["hello abc", "a photo of a cat", ""])
    assert emb.shape == (3, 77, 32) and emb.dtype == torch.float32
    assert encoder.dim == 32 and encoder.max_length == 77
    assert encoder.encode("hello").shape == (1, 77, 32)
    assert encoder.encode([]).shape == (0, 77, 32)


def test_deterministic_and_batch_independent(encoder):
    a = encoder.encode(["hello abc", "cat"])
    torch.testing.assert_close(encoder.encode(["hello abc", "cat"]), a, rtol=0, atol=0)
    torch.testing.assert_close(encoder.encode(["cat"])[0], a[1])
    assert not torch.allclose(a[0], a[1])


def test_matches_last_hidden_state_without_mask(encoder):
    ids = encoder.tokenize(["hello cat"])
    with torch.no_grad():
        expected = encoder.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(encoder.encode(["hello cat"]), expected, rtol=0, atol=0)


def test_padding_and_truncation(encoder):
    tok = encoder.tokenizer
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    short, long = encoder.tokenize(["hello abc", " ".join(["cat"] * 200)])
    assert short.shape == long.shape == (77,)
    assert short[:3].tolist() == [bos, tok.convert_tokens_to_ids("hello</w>"), tok.convert_tokens_to_ids("abc</w>")]
    assert short[3] == eos and (short[4:] == pad).all()
    assert long[0] == bos and long[-1] == eos
    assert (long[1:-1] == tok.convert_tokens_to_ids("cat</w>")).all()


def test_single_folder_layout(pipeline_dir, encoder, tmp_path):
    flat = tmp_path / "clip"
    shutil.copytree(pipeline_dir / "text_encoder", flat)
    for f in (pipeline_dir / "tokenizer").iterdir():
        shutil.copy(f, flat / f.name)
    other = load_text_encoder(flat)
    prompts = ["hello abc", "a cat"]
    torch.testing.assert_close(other.encode(prompts), encoder.encode(prompts), rtol=0, atol=0)


def test_reduced_precision(pipeline_dir, encoder):
    half = load_text_encoder(pipeline_dir, dtype=torch.bfloat16)
    emb = half.encode(["hello abc"])
    assert emb.dtype == torch.bfloat16 and half.dtype == torch.bfloat16
    torch.testing.assert_close(emb.float(), encoder.encode(["hello abc"]), rtol=0.05, atol=0.05)


def test_max_length_fallback(tmp_path, encoder):
    write_tokenizer(tmp_path / "tok", model_max_length=None)
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    assert tokenizer.model_max_length > 10**6
    te = TextEncoder(tokenizer, encoder.model)
    assert te.max_length == 77 and te.tokenize(["cat"]).shape == (1, 77)
    assert TextEncoder(tokenizer, encoder.model, max_length=16).tokenize(["cat"]).shape == (1, 16)


def test_missing_folder_errors(tmp_path, pipeline_dir):
    with pytest.raises(FileNotFoundError, match=r"no_such_dir.*does not exist"):
        load_text_encoder(tmp_path / "no_such_dir")

    only_tok = tmp_path / "only_tok"
    write_tokenizer(only_tok / "tokenizer")
    with pytest.raises(FileNotFoundError, match=r"only_tok.*missing text model config\.json.*text model weights"):
        load_text_encoder(only_tok)

    no_tok = tmp_path / "no_tok"
    shutil.copytree(pipeline_dir / "text_encoder", no_tok / "text_encoder")
    with pytest.raises(FileNotFoundError, match=r"no_tok.*vocab\.json \+ merges\.txt"):
        load_text_encoder(no_tok)


def test_incomplete_weights_are_an_error(tmp_path, pipeline_dir):
    broken = tmp_path / "broken"
    shutil.copytree(pipeline_dir, broken)
    weights = broken / "text_encoder" / "model.safetensors"
    sd = load_file(weights)
    dropped = sorted(k for k in sd if "layers.1.mlp.fc2.weight" in k)
    assert dropped
    save_file({k: v for k, v in sd.items() if k not in dropped}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"broken.*text_encoder.*missing 1: .*layers\.1\.mlp\.fc2\.weight"):
        load_text_encoder(broken)


def test_transformers_4_checkpoint_layout(tmp_path, pipeline_dir, encoder):
    """SD folders were written by transformers 4: `text_model.` prefix plus a stored position_ids buffer."""
    old = tmp_path / "old"
    shutil.copytree(pipeline_dir, old)
    weights = old / "text_encoder" / "model.safetensors"
    sd = {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in load_file(weights).items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    weights.unlink()
    torch.save(sd, old / "text_encoder" / "pytorch_model.bin")
    prompts = ["hello abc", "a cat"]
    torch.testing.assert_close(load_text_encoder(old).encode(prompts), encoder.encode(prompts), rtol=0, atol=0)
