"""Contracts of merging LoRAs together and into checkpoints (merge.py, lycoris_merge.py)."""

from __future__ import annotations

import json

import pytest
import torch

from sd_scripts.models import ldm_convert
from sd_scripts.core.errors import ConfigError
from sd_scripts.files.lora_file import load_lora_file, save_lora_file
from sd_scripts.files.lora_keys import lora_name
from sd_scripts.networks.lycoris_merge import NetworkInput, merge_into_checkpoint
from sd_scripts.networks.merge import merge_lora_files, merge_networks_concat, merge_networks_svd
from sd_scripts.networks.network_state import parse_network
from tests import lora_synth as ls


def _deltas(sd):
    return {name: m.delta() for name, m in parse_network(sd).items()}


def _summed(pairs):
    total = {}
    for sd, ratio in pairs:
        for name, delta in _deltas(sd).items():
            flat = delta.reshape(delta.shape[0], -1)
            total[name] = total.get(name, 0) + ratio * flat
    return total


def _nets(*pairs):
    return [(f"net{i}", parse_network(sd), ratio) for i, (sd, ratio) in enumerate(pairs)]


# ---------------------------------------------------------------- LoRA + LoRA


def test_concat_is_exact_and_keeps_strengths():
    a = ls.mixed_lora(seed=1, r=8, conv_r=4, alpha=1.0, conv_alpha=4.0)
    b = ls.mixed_lora(seed=2, r=4, conv_r=2, alpha=4.0, conv_alpha=1.0, tucker=True)
    b.update(ls.lora("lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 16, 24, 3, alpha=1.0))
    pairs = [(a, 0.7), (b, -1.3)]
    sd, reports = merge_networks_concat(_nets(*pairs))
    got = _deltas(sd)
    want = _summed(pairs)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name].reshape(want[name].shape), want[name], rtol=1e-5, atol=1e-7)
    ranks = {r.name: r.rank for r in reports}
    assert ranks[ls.LIN] == 12 and ranks[ls.CONV3] == 6
    assert {float(v) for k, v in sd.items() if k.endswith(".alpha")} == {12.0}  # one alpha: the most common rank


def test_concat_of_two_equal_loras_doubles_not_halves():
    a = ls.mixed_lora(seed=3)
    sd, _ = merge_networks_concat(_nets((a, 1.0), (a, 1.0)))
    for name, delta in _deltas(sd).items():
        torch.testing.assert_close(delta, 2 * _deltas(a)[name], rtol=1e-5, atol=1e-7)


def test_concat_handles_loha_lokr_and_full_exactly():
    g = ls.gen(4)
    a = ls.loha(ls.CONV3, 32, 16, 2, kernel=3, alpha=1.0, g=g)
    b = ls.lora(ls.CONV3, 32, 16, 4, kernel=3, alpha=2.0, g=g)
    c = ls.lokr(ls.LIN, 8, 8, 6, 8, 2, alpha=1.0, g=g)
    d = {f"{ls.LIN}.diff": torch.randn(64, 48, generator=g) * 0.01}
    pairs = [(a, 0.5), (b, 2.0), (c, -1.0), (d, 0.25)]
    sd, _ = merge_networks_concat(_nets(*pairs))
    got, want = _deltas(sd), _summed(pairs)
    for name in want:
        torch.testing.assert_close(got[name].reshape(want[name].shape), want[name], rtol=1e-4, atol=1e-6)


def test_svd_merge_is_exact_at_full_rank_and_best_below():
    a = ls.mixed_lora(seed=5, r=8, conv_r=4)
    b = ls.mixed_lora(seed=6, r=16, conv_r=2, alpha=3.0)
    pairs = [(a, 0.6), (b, 0.4)]
    want = _summed(pairs)
    sd, reports = merge_networks_svd(_nets(*pairs), new_rank=24, new_conv_rank=6)
    got = _deltas(sd)
    for name in want:
        torch.testing.assert_close(got[name].reshape(want[name].shape), want[name], rtol=1e-4, atol=1e-6)
    assert {float(v) for k, v in sd.items() if k.endswith(".alpha")} == {24.0}
    sd, reports = merge_networks_svd(_nets(*pairs), new_rank=5, new_conv_rank=3)
    got = _deltas(sd)
    for r in reports:
        w = want[r.name].double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        k = 3 if r.conv else 5
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert r.rank == k
        torch.testing.assert_close(got[r.name].reshape(w.shape).double(), best, rtol=1e-3, atol=1e-6)


def test_lora_merge_refuses_shape_mismatch_and_ia3():
    a = ls.lora(ls.LIN, 64, 48, 4)
    b = ls.lora(ls.LIN, 32, 48, 4)
    with pytest.raises(ConfigError, match="different base models"):
        merge_networks_svd(_nets((a, 1.0), (b, 1.0)), new_rank=4)
    c = {f"{ls.LIN}.weight": torch.rand(64), f"{ls.LIN}.on_input": torch.tensor(0)}
    with pytest.raises(ConfigError, match="sd_model"):
        merge_networks_concat(_nets((a, 1.0), (c, 1.0)))


def test_merge_files_writes_metadata_and_checks_inputs(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_lora_file(a, ls.mixed_lora(seed=7), {"ss_base_model_version": "sd_v1", "ss_v2": "False"})
    save_lora_file(b, ls.mixed_lora(seed=8, r=4), {"ss_base_model_version": "sd_v1", "ss_v2": "False"})
    out = tmp_path / "m.safetensors"
    merge_lora_files([a, b], [1.0, 0.5], out, new_rank=6, new_conv_rank=3)
    sd, md = load_lora_file(out)
    assert md["ss_network_dim"] == "6" and md["ss_base_model_version"] == "sd_v1"
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "6.0"}
    assert "sshs_model_hash" in md
    with pytest.raises(ConfigError, match="already exists"):
        merge_lora_files([a, b], [1.0, 0.5], out, concat=True)
    with pytest.raises(ConfigError, match="ratios"):
        merge_lora_files([a, b], [1.0], tmp_path / "x.safetensors", concat=True)
    with pytest.raises(ConfigError, match="new_rank"):
        merge_lora_files([a, b], [1.0, 1.0], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------- into a checkpoint


def _ldm_index(parts, family):
    """``{kohya name: (ldm key, rows)}`` built from ldm_convert's key maps (not from the code under test)."""
    kind = "clip" if family == "sd1" else "openclip"
    km = ldm_convert.unet_ldm_key_map(parts["unet"])
    tk = ldm_convert.text_encoder_ldm_key_map(parts["text_encoder"], kind)
    index = {}
    for path, module in parts["unet"].named_modules():
        if path + ".weight" in km:
            index[lora_name("lora_unet", path)] = (km[path + ".weight"], None)
    for path, module in parts["text_encoder"].named_modules():
        if path + ".weight" in tk:
            rows = None
            chunk = ldm_convert.qkv_chunk_index(path + ".weight") if family == "sd2" else None
            if chunk is not None:
                d = module.weight.shape[0]
                rows = (chunk * d, (chunk + 1) * d)
            index[lora_name("lora_te", path)] = (tk[path + ".weight"], rows)
    return index


def _hand_delta(parts: dict, name: str, base_w: torch.Tensor) -> torch.Tensor:
    """The documented formulas, written out directly on the raw tensors."""
    p = {k.split(".", 1)[1]: v.double() for k, v in parts.items() if k.startswith(name + ".")}
    out = base_w.shape[0]
    if "lora_up.weight" in p:
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        r = down.shape[0]
        alpha = float(p.get("alpha", torch.tensor(r)))
        if "lora_mid.weight" in p:
            w = torch.einsum("ijkl,pi,jq->pqkl", p["lora_mid.weight"], up.flatten(1), down.flatten(1))
        else:
            w = up.flatten(1) @ down.flatten(1)
        return (alpha / r) * w.reshape(base_w.shape)
    if "hada_w1_a" in p:
        r = p["hada_w1_b"].shape[0]
        alpha = float(p["alpha"])
        return (alpha / r) * ((p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])).reshape(base_w.shape)
    if "lokr_w1" in p:
        r = p["lokr_w2_b"].shape[0]
        w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
        return (float(p["alpha"]) / r) * torch.kron(p["lokr_w1"], w2).reshape(base_w.shape)
    if "diff" in p:
        return p["diff"].reshape(base_w.shape)
    if "on_input" in p:
        w = p["weight"].flatten()
        return base_w.double() * (w[None, :] if int(p["on_input"]) else w[:, None])
    raise AssertionError(name)


def _networks_for(state, family):
    """Three networks covering every algorithm, on real layers of the tiny checkpoint."""
    g = ls.gen(11)
    lora = ls.lora_for_checkpoint(state, seed=12, alpha=2.0, every=2)
    lyco = {}
    lyco.update(ls.lora("lora_unet_mid_block_resnets_0_conv1", 64, 64, 3, kernel=3, tucker=True, alpha=1.5, g=g))
    lyco.update(ls.loha("lora_unet_down_blocks_1_resnets_0_conv2", 64, 64, 2, kernel=3, alpha=1.0, g=g))
    lyco.update(ls.loha("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", 64, 64, 4, alpha=2.0, g=g))
    lyco.update(ls.lokr("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k", 4, 8, 4, 8, 2,
                        alpha=1.0, g=g))
    lyco.update(ls.loha("lora_te_text_model_encoder_layers_1_self_attn_k_proj", 64, 64, 2, alpha=1.0, g=g))
    other = {
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2.diff": torch.randn(32, 128, generator=g) * 0.01,
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2.diff_b": torch.randn(32, generator=g) * 0.01,
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.weight": torch.randn(32, generator=g) * 0.1,
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.on_input": torch.tensor(0),
        "lora_te_text_model_encoder_layers_0_mlp_fc2.weight": torch.randn(256, generator=g) * 0.1,
        "lora_te_text_model_encoder_layers_0_mlp_fc2.on_input": torch.tensor(1),
        "lora_te_text_model_encoder_layers_2_self_attn_q_proj.weight": torch.randn(64, generator=g) * 0.1,
        "lora_te_text_model_encoder_layers_2_self_attn_q_proj.on_input": torch.tensor(0),
    }
    return [(lora, 0.8), (lyco, -0.5), (other, 1.3)]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_merge_into_checkpoint_equals_base_plus_sum_of_ratio_deltas(family):
    state, parts = ls.ldm_checkpoint(family, seed=1)
    state["model.diffusion_model.out.2.weight"] = state["model.diffusion_model.out.2.weight"].half()
    base = {k: v.clone() for k, v in state.items()}
    nets = _networks_for(state, family)
    report = merge_into_checkpoint(state, [NetworkInput(f"n{i}", parse_network(sd), r) for i, (sd, r) in enumerate(nets)])
    assert not any(report.unmatched.values())
    index = _ldm_index(parts, family)
    expected = {k: v.double() for k, v in base.items() if v.is_floating_point()}
    bias_expected = {}
    for sd, ratio in nets:
        for name in {k.split(".", 1)[0] for k in sd}:
            key, rows = index[name]
            sl = slice(*rows) if rows else slice(None)
            expected[key][sl] += ratio * _hand_delta(sd, name, base[key][sl])
            if f"{name}.diff_b" in sd:
                bkey = key[: -len("weight")] + "bias"
                bias_expected[bkey] = expected[bkey]
                expected[bkey] += ratio * sd[f"{name}.diff_b"].double()
    changed = 0
    for key, value in state.items():
        assert value.dtype == base[key].dtype, key
        if value.is_floating_point():
            tol = 1e-5 if value.dtype == torch.float32 else 1e-2
            torch.testing.assert_close(value.double(), expected[key].to(value.dtype).double(), rtol=tol, atol=tol)
            changed += not torch.equal(value, base[key])
        else:
            assert torch.equal(value, base[key])
    assert changed > 40


def test_merge_into_checkpoint_file_keeps_other_keys_and_metadata(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sd_scripts.networks.lycoris_merge import merge_lycoris_file, merge_networks_into_checkpoint_file

    state, _ = ls.ldm_checkpoint("sd1", seed=2, dtype=torch.float16)
    state["some_extra.key"] = torch.arange(5)
    ckpt = tmp_path / "model.safetensors"
    save_file(state, str(ckpt), {"format": "pt", "note": "mine"})
    lora = tmp_path / "l.safetensors"
    save_lora_file(lora, ls.lora_for_checkpoint(state, seed=3), {})
    out = tmp_path / "out.safetensors"
    merge_networks_into_checkpoint_file(ckpt, [lora], [0.5], out)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["note"] == "mine"
        assert set(f.keys()) == set(state)
        assert torch.equal(f.get_tensor("some_extra.key"), torch.arange(5))
        assert all(f.get_tensor(k).dtype == state[k].dtype for k in f.keys())
    with pytest.raises(ConfigError, match="v2"):
        merge_networks_into_checkpoint_file(ckpt, [lora], [0.5], tmp_path / "o2.safetensors", v2=True)
    with pytest.raises(ConfigError, match="ratio"):
        merge_networks_into_checkpoint_file(ckpt, [lora], [0.5, 1.0], tmp_path / "o2.safetensors")
    # a network for a model with another cross-attention width (SD2 on SD1): shapes differ
    lora2 = tmp_path / "l2.safetensors"
    save_lora_file(lora2, ls.lora("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 32, 96, 4), {})
    with pytest.raises(ConfigError, match="shaped"):
        merge_lycoris_file(ckpt, lora2, tmp_path / "o2.safetensors")
    assert not (tmp_path / "o2.safetensors").exists()
    # .ckpt out, float32
    merge_lycoris_file(ckpt, lora, tmp_path / "o3.ckpt", weight=1.0, dtype="float")
    loaded = torch.load(tmp_path / "o3.ckpt", weights_only=True)["state_dict"]
    assert loaded["model.diffusion_model.out.2.weight"].dtype == torch.float32


def test_merged_lora_loads_in_diffusers_and_matches_hand_merge(tmp_path, tiny_sd1_diffusers):
    """The concat-merged kohya file reproduces, in diffusers, the checkpoint merge of its two sources."""
    pipe, state = ls.pipeline_checkpoint(tiny_sd1_diffusers)
    a = ls.lora_for_checkpoint(state, seed=21, alpha=2.0)
    b = ls.lora_for_checkpoint(state, seed=22, every=3, rank=2)
    paths = []
    for i, sd in enumerate((a, b)):
        paths.append(tmp_path / f"{i}.safetensors")
        save_lora_file(paths[-1], sd, {"ss_network_module": "networks.lora"})
    merged_file = tmp_path / "merged.safetensors"
    merge_lora_files(paths, [0.75, -1.5], merged_file, concat=True)
    merge_into_checkpoint(state, [NetworkInput("a", parse_network(a), 0.75), NetworkInput("b", parse_network(b), -1.5)])
    ls.assert_diffusers_fuses_to(pipe, merged_file, state, atol=1e-5)
