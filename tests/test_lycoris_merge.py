"""LyCORIS networks merged into checkpoints (sd_scripts/networks/lycoris_merge.py), file to file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd_scripts.core.errors import ConfigError
from sd_scripts.files.lora_file import save_lora_file
from sd_scripts.networks.lycoris_merge import merge_lycoris_file
from tests import lora_synth as ls

Q = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight"
Q_NAME = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "model.diffusion_model.middle_block.0.in_layers.2.weight"
CONV_NAME = "lora_unet_mid_block_resnets_0_conv1"
FF2 = "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2"
FF2_NAME = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"
NORM = "model.diffusion_model.middle_block.0.in_layers.0"
NORM_NAME = "lora_unet_mid_block_resnets_0_norm1"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    state, _ = ls.ldm_checkpoint("sd1", seed=9)
    path = tmp_path_factory.mktemp("ckpt") / "base.safetensors"
    save_file(state, str(path), {"format": "pt"})
    return path, state


def _merge(tmp_path, ckpt, network, weight=1.0, **kw):
    path, state = ckpt
    net = tmp_path / "net.safetensors"
    save_lora_file(net, network, {})
    out = tmp_path / "out.safetensors"
    merge_lycoris_file(path, net, out, weight=weight, overwrite=True, **kw)
    return load_file(str(out)), state


def test_loha_is_scaled_by_alpha_over_rank_once(tmp_path, ckpt):
    g = ls.gen(1)
    net = ls.loha(Q_NAME, 64, 64, 4, alpha=1.0, g=g)  # alpha/r = 0.25: LyCORIS' own merge would apply 0.0625
    merged, base = _merge(tmp_path, ckpt, net, weight=0.8)
    w1 = net[f"{Q_NAME}.hada_w1_a"] @ net[f"{Q_NAME}.hada_w1_b"]
    w2 = net[f"{Q_NAME}.hada_w2_a"] @ net[f"{Q_NAME}.hada_w2_b"]
    torch.testing.assert_close(merged[Q], base[Q] + 0.8 * 0.25 * w1 * w2, rtol=1e-5, atol=1e-6)
    others = [k for k in base if k != Q]
    assert all(torch.equal(merged[k], base[k]) for k in others)


def test_lokr_scale_rules(tmp_path, ckpt):
    g = ls.gen(2)
    decomposed = ls.lokr(Q_NAME, 8, 8, 8, 8, 2, alpha=1.0, g=g)  # w2 decomposed: scale alpha/r = 0.5
    merged, base = _merge(tmp_path, ckpt, decomposed)
    w2 = decomposed[f"{Q_NAME}.lokr_w2_a"] @ decomposed[f"{Q_NAME}.lokr_w2_b"]
    torch.testing.assert_close(merged[Q], base[Q] + 0.5 * torch.kron(decomposed[f"{Q_NAME}.lokr_w1"], w2), rtol=1e-5, atol=1e-6)
    full = ls.lokr(Q_NAME, 8, 8, 8, 8, 2, alpha=7.0, w2_decomposed=False, g=g)  # both full: scale 1 whatever alpha
    merged, base = _merge(tmp_path, ckpt, full)
    torch.testing.assert_close(merged[Q], base[Q] + torch.kron(full[f"{Q_NAME}.lokr_w1"], full[f"{Q_NAME}.lokr_w2"]),
                               rtol=1e-5, atol=1e-6)


def test_locon_tucker_conv_is_merged_per_kernel_position(tmp_path, ckpt):
    net = ls.lora(CONV_NAME, 64, 64, 3, kernel=3, tucker=True, alpha=1.5, g=ls.gen(3))
    merged, base = _merge(tmp_path, ckpt, net, weight=-1.0)
    mid, up, down = (net[f"{CONV_NAME}.lora_mid.weight"], net[f"{CONV_NAME}.lora_up.weight"][:, :, 0, 0],
                     net[f"{CONV_NAME}.lora_down.weight"][:, :, 0, 0])
    delta = 0.5 * torch.einsum("ijkl,pi,jq->pqkl", mid, up, down)
    torch.testing.assert_close(merged[CONV], base[CONV] - delta, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(delta[:, :, 0, 0], delta[:, :, 1, 1])  # not broadcast like kohya's merge


def test_ia3_full_and_norm(tmp_path, ckpt):
    g = ls.gen(4)
    net = {
        f"{Q_NAME}.weight": torch.randn(64, generator=g),
        f"{Q_NAME}.on_input": torch.tensor(1),
        f"{FF2_NAME}.diff": torch.randn(64, 256, generator=g) * 0.01,
        f"{FF2_NAME}.diff_b": torch.randn(64, generator=g) * 0.01,
        f"{NORM_NAME}.w_norm": torch.randn(64, generator=g) * 0.01,
        f"{NORM_NAME}.b_norm": torch.randn(64, generator=g) * 0.01,
    }
    merged, base = _merge(tmp_path, ckpt, net, weight=0.5)
    torch.testing.assert_close(merged[Q], base[Q] * (1 + 0.5 * net[f"{Q_NAME}.weight"][None, :]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged[FF2 + ".weight"], base[FF2 + ".weight"] + 0.5 * net[f"{FF2_NAME}.diff"])
    torch.testing.assert_close(merged[FF2 + ".bias"], base[FF2 + ".bias"] + 0.5 * net[f"{FF2_NAME}.diff_b"])
    torch.testing.assert_close(merged[NORM + ".weight"], base[NORM + ".weight"] + 0.5 * net[f"{NORM_NAME}.w_norm"])
    torch.testing.assert_close(merged[NORM + ".bias"], base[NORM + ".bias"] + 0.5 * net[f"{NORM_NAME}.b_norm"])


def test_dtype_option_and_ckpt_input(tmp_path, ckpt):
    _, state = ckpt
    pickled = tmp_path / "base.ckpt"
    torch.save({"state_dict": state}, pickled)
    net = tmp_path / "n.safetensors"
    save_lora_file(net, ls.loha(Q_NAME, 64, 64, 2, alpha=2.0), {})
    out = tmp_path / "o.safetensors"
    merge_lycoris_file(pickled, net, out, dtype="fp16")
    merged = load_file(str(out))
    assert merged[Q].dtype == torch.float16 and set(merged) == set(state)


def test_partial_match_is_reported_and_no_match_refused(tmp_path, ckpt):
    path, _ = ckpt
    net = {**ls.loha(Q_NAME, 64, 64, 2), **ls.lora("lora_unet_not_a_layer", 8, 8, 2)}
    save_lora_file(tmp_path / "n.safetensors", net, {})
    report = merge_lycoris_file(path, tmp_path / "n.safetensors", tmp_path / "o.safetensors")
    assert report.unmatched[str(tmp_path / "n.safetensors")] == ["lora_unet_not_a_layer"]
    save_lora_file(tmp_path / "sdxl.safetensors", ls.lora("lora_unet_input_blocks_4_1_proj_in", 8, 8, 2), {})
    with pytest.raises(ConfigError, match="none of its"):
        merge_lycoris_file(path, tmp_path / "sdxl.safetensors", tmp_path / "o2.safetensors")
    assert not (tmp_path / "o2.safetensors").exists()


@pytest.mark.parametrize("network,match", [
    ({f"{Q_NAME}.lambda_layer": torch.zeros(1, 2), f"{Q_NAME}.q_layer.weight": torch.zeros(2, 64)}, "T-LoRA"),
    ({f"{Q_NAME}.oft_diag": torch.zeros(4, 16, 16)}, "OFT"),
    ({f"{Q_NAME}.lora_down.weight": torch.zeros(2, 64), f"{Q_NAME}.lora_up.weight": torch.zeros(64, 2),
      f"{Q_NAME}.dora_scale": torch.ones(7, 1)}, "dora_scale of 7 values"),
    ({f"{Q_NAME}.mystery": torch.zeros(3)}, "unknown key layout"),
    ({"model.diffusion_model.out.2.weight": torch.zeros(3)}, "not a kohya LoRA"),
])
def test_unsupported_networks_are_refused(tmp_path, ckpt, network, match):
    path, _ = ckpt
    from safetensors.torch import save_file as raw_save

    raw_save(network, str(tmp_path / "n.safetensors"))
    with pytest.raises(ConfigError, match=match):
        merge_lycoris_file(path, tmp_path / "n.safetensors", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
