"""Contracts of the LoRA resize (sd_scripts/networks/resize.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sd_scripts.core.errors import ConfigError
from sd_scripts.networks import lora_math as lm
from sd_scripts.networks.network_state import parse_network
from sd_scripts.networks.resize import resize_lora_file, resize_network
from tests import lora_synth as ls


def _deltas(sd, metadata=None):
    return {name: m.delta() for name, m in parse_network(sd, metadata=metadata).items()}


def _best_rank_k(delta, k):
    w = delta.reshape(delta.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vh[:k]).reshape(delta.shape).float()


@pytest.mark.parametrize("tucker", [False, True])
def test_resize_at_current_rank_changes_nothing(tucker):
    sd = ls.mixed_lora(seed=1, r=8, conv_r=4, tucker=tucker)
    res = resize_network(parse_network(sd), new_rank=8, new_conv_rank=4)
    before, after = _deltas(sd), _deltas(res.state_dict)
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-4, atol=1e-6)
        assert after[name].shape == before[name].shape
    for m in res.modules:
        assert m.new_rank == (4 if m.conv else 8)
        assert m.fro == pytest.approx(1.0, abs=1e-6)
    alphas = {float(v) for key, v in res.state_dict.items() if key.endswith(".alpha")}
    assert alphas == {4.0}  # one alpha per file, as training writes
    assert "lora_mid.weight" not in {k.split(".", 1)[1] for k in res.state_dict}


def test_fixed_resize_is_the_best_low_rank_approximation_and_keeps_strength():
    sd = ls.mixed_lora(seed=2, r=8, conv_r=6, alpha=1.0, conv_alpha=3.0)
    res = resize_network(parse_network(sd), new_rank=3, new_conv_rank=2)
    before, after = _deltas(sd), _deltas(res.state_dict)
    for m in res.modules:
        k = 2 if m.conv else 3
        assert m.new_rank == k
        torch.testing.assert_close(after[m.name], _best_rank_k(before[m.name], k), rtol=1e-4, atol=1e-6)
    # one alpha for the whole file (kohya keeps alpha / r; the linear modules' value wins, conv scale is folded)
    assert {float(v) for key, v in res.state_dict.items() if key.endswith(".alpha")} == {1.0 / 8 * 3}
    down = res.state_dict[f"{ls.CONV3}.lora_down.weight"]
    assert down.shape == (2, 16, 3, 3)
    assert res.state_dict[f"{ls.PROJ}.lora_down.weight"].shape == (3, 32, 1, 1)  # 1x1 conv takes the linear rank


@pytest.mark.parametrize("method,param", [("sv_ratio", 3.0), ("sv_fro", 0.9), ("sv_cumulative", 0.8), ("sv_fro", 0.999)])
def test_dynamic_methods_pick_the_numpy_reference_rank(method, param):
    g = ls.gen(3)
    sd = {}
    names = []
    for i in range(5):
        name = f"lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn{i}_to_v"
        names.append(name)
        sd.update(ls.lora(name, 40, 30, 12, alpha=6.0, g=g))
        # give each module a clearly decaying spectrum
        sd[f"{name}.lora_up.weight"] *= torch.tensor([0.6 ** j for j in range(12)])[None, :]
    res = \
        resize_network(parse_network(sd), new_rank=10, method=method, param=param)
    for m in res.modules:
        delta = parse_network(sd)[m.name].delta()
        s = np.linalg.svd(delta.double().numpy(), compute_uv=False)[:12]
        if method == "sv_ratio":
            want = int(np.sum(s[0] / s <= param))
        elif method == "sv_fro":
            want = int(np.argmax(np.sqrt(np.cumsum(s ** 2) / np.sum(s ** 2)) >= param - 1e-12)) + 1
        else:
            want = int(np.argmax(np.cumsum(s) / np.sum(s) >= param - 1e-12)) + 1
        assert m.new_rank == min(max(want, 1), 10), (m.name, s)
        stats = np.sqrt(np.sum(s[: m.new_rank] ** 2) / np.sum(s ** 2))
        assert m.fro == pytest.approx(stats, rel=1e-4)


def test_dynamic_resize_never_exceeds_the_module_rank():
    sd = ls.mixed_lora(seed=4, r=4, conv_r=2)
    res = resize_network(parse_network(sd), new_rank=64, method="sv_ratio", param=1e9)
    for m in res.modules:
        assert m.new_rank == (2 if m.conv else 4)


def test_rank_above_current_is_refused_not_padded():
    sd = ls.mixed_lora(seed=5, r=8, conv_r=4)
    with pytest.raises(ConfigError, match="above"):
        resize_network(parse_network(sd), new_rank=16, new_conv_rank=8)
    # above for the linear modules but below for conv: linear modules keep their rank
    res = resize_network(parse_network(sd), new_rank=16, new_conv_rank=2)
    assert {m.new_rank for m in res.modules if not m.conv} == {8}
    assert {m.new_rank for m in res.modules if m.conv} == {2}


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_rank_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="new_rank"):
        resize_network(parse_network(ls.mixed_lora()), new_rank=bad)


@pytest.mark.parametrize("kind", ["loha", "loha_tucker", "lokr", "lokr_conv_tucker", "lokr_conv_flat", "full"])
def test_lycoris_modules_become_locon_with_the_same_delta(kind):
    g = ls.gen(6)
    if kind == "loha":
        sd = ls.loha(ls.CONV3, 16, 8, 3, kernel=3, alpha=1.5, g=g)
    elif kind == "loha_tucker":
        sd = ls.loha(ls.CONV3, 16, 8, 3, kernel=3, alpha=1.5, tucker=True, g=g)
    elif kind == "lokr":
        sd = ls.lokr(ls.LIN, 4, 8, 4, 6, 2, alpha=1.0, g=g)
    elif kind == "lokr_conv_tucker":
        sd = ls.lokr(ls.CONV3, 2, 8, 2, 4, 2, kernel=3, tucker=True, alpha=1.0, g=g)
    elif kind == "lokr_conv_flat":
        sd = ls.lokr(ls.CONV3, 2, 8, 2, 4, 2, kernel=3, alpha=1.0, g=g)
    else:
        sd = {f"{ls.LIN}.diff": _best_rank_k(torch.randn(24, 20, generator=g), 5)}
    mod = parse_network(sd)[next(iter(parse_network(sd)))]
    bound = mod.rank_bound()
    res = resize_network(parse_network(sd), new_rank=bound, new_conv_rank=bound)
    (name, after), = _deltas(res.state_dict).items()
    torch.testing.assert_close(after, mod.delta(), rtol=1e-4, atol=1e-5)
    assert res.modules[0].algo == kind.split("_")[0]
    assert f"{name}.lora_up.weight" in res.state_dict
    # and a lower rank gives the best approximation of the rebuilt delta
    res = resize_network(parse_network(sd), new_rank=2, new_conv_rank=2)
    (_, after), = _deltas(res.state_dict).items()
    torch.testing.assert_close(after, _best_rank_k(mod.delta(), 2), rtol=1e-3, atol=1e-5)


def test_ia3_modules_are_copied():
    sd = ls.mixed_lora(seed=7)
    sd["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k.weight"] = torch.rand(64)
    sd["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k.on_input"] = torch.tensor(0)
    res = resize_network(parse_network(sd), new_rank=4, new_conv_rank=2)
    assert res.copied == ["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k"]
    assert torch.equal(res.state_dict["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k.weight"],
                       sd["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k.weight"])


def test_resize_file_round_trip(tmp_path):
    from safetensors.torch import save_file

    from sd_scripts.files.lora_file import load_lora_file

    sd = {k: v.half() for k, v in ls.mixed_lora(seed=8, r=8, conv_r=4).items()}
    src = tmp_path / "in.safetensors"
    md = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4.0",
          "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "2.0"}), "ss_training_comment": "hello"}
    save_file(sd, str(src), md)
    out = tmp_path / "out.safetensors"
    res = resize_lora_file(src, out, new_rank=4, new_conv_rank=2)
    sd2, md2 = load_lora_file(out)
    assert all(t.dtype == torch.float16 for t in sd2.values())  # input precision kept
    assert md2["ss_network_dim"] == "4"
    assert md2["ss_network_alpha"] == "2.0"
    assert json.loads(md2["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}
    assert md2["ss_training_comment"].startswith("rank resized from 8 to 4 (conv: 2)")
    assert md2["ss_training_comment"].endswith("; hello")
    assert "sshs_model_hash" in md2
    assert len(res.modules) == 5
    res = resize_lora_file(src, tmp_path / "dyn.safetensors", new_rank=8, method="sv_fro", param=0.5,
                           save_precision="float")
    sd3, md3 = load_lora_file(tmp_path / "dyn.safetensors")
    assert md3["ss_network_dim"] == "Dynamic" and sd3[f"{ls.LIN}.lora_up.weight"].dtype == torch.float32


def test_rank_selection_helper_agrees_with_resize():
    # factor-space spectrum == dense spectrum for a LoRA module
    sd = ls.lora(ls.LIN, 64, 48, 8, alpha=8.0, g=ls.gen(9))
    mod = parse_network(sd)[ls.LIN]
    fs = lm.factor_svd(*mod.updown(), force="factor")
    dense = lm.dense_svd(mod.delta())
    torch.testing.assert_close(fs.S[:8], dense.S[:8], rtol=1e-4, atol=1e-6)


def test_dynamic_resize_output_loads_in_diffusers(tmp_path, tiny_sd1_diffusers):
    """Per-module ranks (and the one-alpha rule) reproduce our own merge of the resized file in diffusers."""
    from sd_scripts.files.lora_file import save_lora_file
    from sd_scripts.networks.lycoris_merge import NetworkInput, merge_into_checkpoint

    pipe, state = ls.pipeline_checkpoint(tiny_sd1_diffusers)
    lora = ls.lora_for_checkpoint(state, rank=8, conv_rank=4, seed=31, alpha=4.0)
    for key in lora:  # decaying spectra, different per module, so the chosen ranks differ
        if key.endswith("lora_up.weight"):
            r = lora[key].shape[1]
            lora[key] = lora[key] * torch.tensor([0.5 ** (j * (1 + len(key) % 3)) for j in range(r)]).reshape(
                (1, r) + (1,) * (lora[key].dim() - 2))
    src = tmp_path / "in.safetensors"
    save_lora_file(src, lora, {})
    out = tmp_path / "out.safetensors"
    res = resize_lora_file(src, out, new_rank=8, method="sv_fro", param=0.95, save_precision="float")
    assert len({m.new_rank for m in res.modules}) > 1
    from sd_scripts.files.lora_file import load_lora_file

    resized, _ = load_lora_file(out)
    merge_into_checkpoint(state, [NetworkInput("r", parse_network(resized), 1.0)])
    ls.assert_diffusers_fuses_to(pipe, out, state, atol=1e-5)
