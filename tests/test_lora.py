"""LoRA / LyCORIS patches on the spatial layers of tiny LaVie UNets, built from known matrices."""
import pytest
import torch
from safetensors.torch import save_file

from lavie_core.lora import LoraError, apply_loras, lora_deltas, target_table
from test_unet import inputs, tiny_model

torch.set_num_threads(1)

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
FF = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"
CONV = "down_blocks.0.resnets.0.conv1"
PROJ_IN = "down_blocks.0.attentions.0.proj_in"
TEMP_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn_temp.to_q"


def kohya(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


def factors(out_f: int, in_f: int, rank: int, seed: int, kernel: int | None = None):
    g = torch.Generator().manual_seed(seed)
    if kernel is None:
        return torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)
    return torch.randn(rank, in_f, kernel, kernel, generator=g), torch.randn(out_f, rank, 1, 1, generator=g)


def lora_entry(prefix: str, down, up, alpha=None, down_key=".lora_down.weight", up_key=".lora_up.weight"):
    sd = {prefix + down_key: down, prefix + up_key: up}
    if alpha is not None:
        sd[prefix + ".alpha"] = torch.tensor(float(alpha))
    return sd


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def changed(before, model):
    return sorted(k for k, v in model.named_parameters() if not torch.equal(before[k], v))


@pytest.fixture
def model():
    return tiny_model("base", seed=3)


def test_strength_zero_is_exactly_no_lora(model):
    down, up = factors(32, 32, 4, 0)
    args = inputs(model, 1, 3, 8, 8)
    ref = model(*args)
    before = params(model)
    patch = apply_loras(model, [(lora_entry(kohya(Q), down, up, alpha=2), 0.0)])
    assert changed(before, model) == []
    assert torch.equal(model(*args), ref)
    assert patch.reports[0].applied == [kohya(Q)]  # still validated and matched
    patch.remove()


def test_known_matrices_change_exactly_the_targets_by_alpha_over_rank(model):
    rank, alpha, strength = 4, 2.0, 0.75
    down_q, up_q = factors(32, 32, rank, 1)
    down_c, up_c = factors(32, 32, rank, 2, kernel=3)
    sd = {**lora_entry(kohya(Q), down_q, up_q, alpha), **lora_entry(kohya(CONV), down_c, up_c, alpha)}
    before = params(model)
    patch = apply_loras(model, [(sd, strength)])
    assert changed(before, model) == sorted([f"{Q}.weight", f"{CONV}.weight"])
    w = dict(model.named_parameters())
    scale = strength * alpha / rank
    torch.testing.assert_close(w[f"{Q}.weight"], before[f"{Q}.weight"] + scale * up_q @ down_q, rtol=0, atol=1e-6)
    conv_delta = (up_c.flatten(1) @ down_c.flatten(1)).reshape(32, 32, 3, 3)
    torch.testing.assert_close(w[f"{CONV}.weight"], before[f"{CONV}.weight"] + scale * conv_delta, rtol=0, atol=1e-6)
    assert patch.reports[0].formats == ["kohya", "lycoris-locon"]
    patch.remove()
    assert changed(before, model) == []


def test_remove_restores_bit_exactly_also_for_half_precision():
    model = tiny_model("base", seed=4).to(torch.float16)
    before = params(model)
    down, up = factors(256, 32, 8, 5)
    with apply_loras(model, [(lora_entry(kohya(FF), down, up, alpha=8), 1.3)]) as patch:
        assert changed(before, model) == [f"{FF}.weight"]
        assert patch.touched == [f"{FF}.weight"]
    assert changed(before, model) == []
    patch.remove()  # twice is harmless
    assert changed(before, model) == []


def test_stacking_adds_deltas(model):
    d1, u1 = factors(32, 32, 4, 6)
    d2, u2 = factors(32, 32, 2, 7)
    before = params(model)
    first = lora_entry(kohya(Q), d1, u1, alpha=4)
    second = {f"unet.{Q}.lora_A.weight": d2, f"unet.{Q}.lora_B.weight": u2}
    patch = apply_loras(model, [(first, 0.5), (second, -1.5)])
    expected = before[f"{Q}.weight"] + 0.5 * (u1 @ d1) + -1.5 * (u2 @ d2)
    torch.testing.assert_close(dict(model.named_parameters())[f"{Q}.weight"], expected, rtol=0, atol=1e-5)
    assert [r.name for r in patch.reports] == ["LoRA #0", "LoRA #1"]
    patch.remove()
    assert changed(before, model) == []


def _single(model, sd):
    deltas, reports = lora_deltas(model, [(sd, 1.0)])
    return deltas, reports[0]


def test_each_supported_format_gives_the_expected_delta(model):
    down, up = factors(32, 32, 4, 8)
    linear = up @ down
    cases = {
        "kohya": lora_entry(kohya(Q), down, up),
        "kohya-ldm": lora_entry("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", down, up),
        "ldm": lora_entry("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q", down, up),
        "peft": {f"unet.{Q}.lora_A.weight": down, f"unet.{Q}.lora_B.weight": up},
        "peft-raw": {f"base_model.model.{Q}.lora_A.default.weight": down,
                     f"base_model.model.{Q}.lora_B.default.weight": up},
        "diffusers": lora_entry(f"unet.{Q}", down, up, down_key=".lora.down.weight", up_key=".lora.up.weight"),
        "diffusers-attn-processor": {
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": down,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": up,
        },
        "lycoris-prefix": lora_entry("lycoris_" + Q.replace(".", "_"), down, up),
    }
    for fmt, sd in cases.items():
        deltas, report = _single(model, sd)
        assert list(deltas) == [f"{Q}.weight"], fmt
        torch.testing.assert_close(deltas[f"{Q}.weight"], linear, rtol=0, atol=1e-6, msg=fmt)
        assert report.unmatched == [] and report.skipped == 0, fmt
    out_key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
    deltas, _ = _single(model, {f"{out_key}.down.weight": down, f"{out_key}.up.weight": up})
    assert list(deltas) == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"]


def test_lycoris_conv_tucker_loha_lokr_and_full_diff(model):
    g = torch.Generator().manual_seed(9)
    r = 3
    # LoCon with a Tucker core: 1x1 down, kxk mid, 1x1 up.
    down, mid, up = torch.randn(r, 32, 1, 1, generator=g), torch.randn(r, r, 3, 3, generator=g), torch.randn(32, r, 1, 1, generator=g)
    deltas, report = _single(model, {f"{kohya(CONV)}.lora_down.weight": down, f"{kohya(CONV)}.lora_mid.weight": mid,
                                      f"{kohya(CONV)}.lora_up.weight": up, f"{kohya(CONV)}.alpha": torch.tensor(1.5)})
    want = torch.zeros(32, 32, 3, 3)
    for p in range(32):
        for c in range(32):
            want[p, c] = sum(up[p, i, 0, 0] * mid[i, j] * down[j, c, 0, 0] for i in range(r) for j in range(r))
    torch.testing.assert_close(deltas[f"{CONV}.weight"], want * 1.5 / r, rtol=1e-5, atol=1e-5)

    # LoHa on a linear layer: (w1a w1b) * (w2a w2b) * alpha / rank.
    w = {n: torch.randn(*s, generator=g) for n, s in
         (("hada_w1_a", (32, r)), ("hada_w1_b", (r, 32)), ("hada_w2_a", (32, r)), ("hada_w2_b", (r, 32)))}
    deltas, report = _single(model, {f"{kohya(Q)}.{n}": t for n, t in w.items()} | {f"{kohya(Q)}.alpha": torch.tensor(6.0)})
    torch.testing.assert_close(deltas[f"{Q}.weight"],
                               (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) * 2.0,
                               rtol=1e-5, atol=1e-5)
    assert report.formats == ["lycoris-loha"]

    # LoKr: kron(w1, w2_a w2_b) * alpha / rank(w2).
    w1, w2a, w2b = torch.randn(4, 4, generator=g), torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g)
    deltas, report = _single(model, {f"{kohya(Q)}.lokr_w1": w1, f"{kohya(Q)}.lokr_w2_a": w2a,
                                     f"{kohya(Q)}.lokr_w2_b": w2b, f"{kohya(Q)}.alpha": torch.tensor(1.0)})
    torch.testing.assert_close(deltas[f"{Q}.weight"], torch.kron(w1, w2a @ w2b) * 0.5, rtol=1e-6, atol=1e-6)

    # Full difference of weight and bias.
    diff, diff_b = torch.randn(32, 32, 1, 1, generator=g), torch.randn(32, generator=g)
    deltas, report = _single(model, {f"{kohya(PROJ_IN)}.diff": diff, f"{kohya(PROJ_IN)}.diff_b": diff_b})
    assert torch.equal(deltas[f"{PROJ_IN}.weight"], diff) and torch.equal(deltas[f"{PROJ_IN}.bias"], diff_b)


def test_unmatched_text_encoder_and_temporal_keys_are_reported_not_applied(model):
    down, up = factors(32, 32, 4, 10)
    sd = {
        **lora_entry(kohya(Q), down, up),
        **lora_entry(kohya(TEMP_Q), down, up),
        **lora_entry("lora_te_text_model_encoder_layers_0_self_attn_q_proj", down, up),
        **lora_entry("lora_unet_down_blocks_7_attentions_0_proj_in", down, up),
        "some_training_step": torch.tensor(3),
    }
    before = params(model)
    patch = apply_loras(model, [(sd, 1.0, "mixed.safetensors")])
    report = patch.reports[0]
    assert changed(before, model) == [f"{Q}.weight"]  # temporal attention untouched
    assert report.temporal == [kohya(TEMP_Q)]
    assert report.text_encoder == ["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    assert report.unmatched == ["lora_unet_down_blocks_7_attentions_0_proj_in"]
    assert report.unrecognised == ["some_training_step"]
    text = report.summary()
    assert "mixed.safetensors" in text and "1 UNet modules patched" in text
    assert "1 temporal-layer modules left frozen" in text and "lora_unet_down_blocks_7_attentions_0_proj_in" in text
    patch.remove()


def test_sdxl_lora_fails_clearly(tmp_path, model):
    down, up = factors(640, 640, 4, 11)
    sd = lora_entry("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q", down, up)
    path = tmp_path / "sdxl_style.safetensors"
    save_file(sd, str(path))
    before = params(model)
    with pytest.raises(LoraError, match=r"sdxl_style\.safetensors.*not for Stable Diffusion 1\.x.*transformer_blocks_1"):
        apply_loras(model, [(str(path), 1.0)])
    with pytest.raises(ValueError, match="two text encoders"):
        apply_loras(model, [(lora_entry("lora_te2_text_model_encoder_layers_0_mlp_fc1", down, up), 1.0)])
    assert changed(before, model) == []


def test_wrong_dimensions_fail_with_expected_and_found_shapes(tmp_path, model):
    # SD 2.x style: 1024-d text cross-attention keys.
    down, up = factors(32, 1024, 4, 12)
    path = tmp_path / "sd2.safetensors"
    save_file(lora_entry(kohya(K2), down, up), str(path))
    with pytest.raises(ValueError, match=r"sd2\.safetensors: key 'lora_unet_.*attn2_to_k'.*weight is \[32, 32\].*"
                                         r"delta of shape \[32, 1024\].*SD 2\.x"):
        apply_loras(model, [(str(path), 1.0)])
    # Nothing of the file fits: another architecture entirely.
    with pytest.raises(LoraError, match="none of its 1 UNet modules matches"):
        apply_loras(model, [(lora_entry("lora_unet_encoder_blocks_0_mlp", down, up), 1.0)])


def test_interpolation_unet_and_file_round_trip(tmp_path):
    model = tiny_model("interpolation", seed=5)
    down, up = factors(32, 8, 2, 13, kernel=3)
    # An SD LoRA on conv_in has 4 input channels; the copied-latent channels stay unchanged.
    down4 = down[:, :4]
    path = tmp_path / "conv_in.safetensors"
    save_file(lora_entry("lora_unet_conv_in", down4.contiguous(), up, alpha=2), str(path))
    before = params(model)
    patch = apply_loras(model, [(path, 1.0)])
    delta = dict(model.named_parameters())["conv_in.weight"] - before["conv_in.weight"]
    assert torch.count_nonzero(delta[:, 4:]) == 0
    torch.testing.assert_close(delta[:, :4], (up.flatten(1) @ down4.flatten(1)).reshape(32, 4, 3, 3), rtol=0, atol=1e-5)
    assert patch.reports[0].name == "conv_in.safetensors"
    patch.remove()
    assert changed(before, model) == []


def test_target_table_names_every_sd_layer_of_the_released_layout():
    from lavie_core import LaVieUNet, UNetConfig

    with torch.device("meta"):
        model = LaVieUNet(UNetConfig.base())
    table = target_table(model)
    assert table["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q".removeprefix("lora_unet_")] == \
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert table["output_blocks.5.2.conv"] == "up_blocks.1.upsamplers.0.conv"
    assert table["input_blocks_9_0_op"] == "down_blocks.2.downsamplers.0.conv"
    assert table["middle_block_2_emb_layers_1"] == "mid_block.resnets.1.time_emb_proj"
    assert table["out_2"] == "conv_out"
