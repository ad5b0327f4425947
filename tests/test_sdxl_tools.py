"""The side tools on SDXL: merge into an SDXL single-file checkpoint, extraction between two SDXL checkpoints,
LyCORIS merge, LoRA-to-LoRA merge and resize of kohya SDXL files (SGM UNet names, lora_te1_/lora_te2_)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd_scripts.core.errors import ConfigError
from sd_scripts.files.lora_file import load_lora_file, save_lora_file
from sd_scripts.networks.extract import extract_lora_file
from sd_scripts.networks.ldm_lora_map import build_lora_map, checkpoint_family, lora_target_names
from sd_scripts.networks.lycoris_merge import merge_lycoris_file, merge_networks_into_checkpoint_file
from sd_scripts.networks.merge import merge_lora_files
from sd_scripts.networks.resize import resize_lora_file
from tests import lora_synth as ls

U = "model.diffusion_model."
Q = U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
Q_NAME = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
Q_DIFFUSERS = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = U + "input_blocks.1.0.in_layers.2.weight"
CONV_NAME = "lora_unet_input_blocks_1_0_in_layers_2"
TE1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight"
TE1_NAME = "lora_te1_text_model_encoder_layers_0_self_attn_k_proj"
IN_PROJ = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
TE2_V_NAME = "lora_te2_text_model_encoder_layers_1_self_attn_v_proj"
TE2_FC1 = "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_fc.weight"
TE2_FC1_NAME = "lora_te2_text_model_encoder_layers_1_mlp_fc1"


@pytest.fixture(scope="module")
def base(tiny_sdxl_single_file):
    return tiny_sdxl_single_file, load_file(str(tiny_sdxl_single_file))


def _lora(name, shape, r, g, alpha=None, scale=0.1):
    if len(shape) == 4:
        down = torch.randn(r, *shape[1:], generator=g) * scale
        up = torch.randn(shape[0], r, 1, 1, generator=g) * scale
    else:
        down = torch.randn(r, shape[1], generator=g) * scale
        up = torch.randn(shape[0], r, generator=g) * scale
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(float(alpha if alpha is not None else r))}


def _delta(sd, name):
    up, down = sd[f"{name}.lora_up.weight"].float(), sd[f"{name}.lora_down.weight"].float()
    r = down.shape[0]
    scale = float(sd[f"{name}.alpha"]) / r
    return scale * (up.reshape(up.shape[0], -1) @ down.reshape(r, -1))


def test_map_detects_sdxl_and_names_modules_like_kohya(base):
    _, state = base
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert checkpoint_family(shapes) == "sdxl"
    lmap = build_lora_map(shapes)
    names = lora_target_names(lmap, shapes=shapes)
    assert len(names) == len(set(names))
    assert lmap[Q_NAME].weight_key == Q and lmap[Q_NAME].lora_target
    assert lmap[Q_DIFFUSERS].weight_key == Q and not lmap[Q_DIFFUSERS].lora_target  # accepted, never extracted twice
    assert lmap[CONV_NAME].weight_key == CONV
    assert lmap[CONV_NAME].conv_only and lmap["lora_unet_input_blocks_3_0_op"].conv_only
    assert not lmap[Q_NAME].conv_only and not lmap[TE1_NAME].conv_only
    assert lmap["lora_unet_input_blocks_3_0_op"].lora_target
    assert lmap["lora_unet_output_blocks_2_2_conv"].lora_target
    assert lmap[TE1_NAME].weight_key == TE1
    d = shapes[IN_PROJ][0] // 3
    assert lmap[TE2_V_NAME].weight_key == IN_PROJ and lmap[TE2_V_NAME].rows == (2 * d, 3 * d)
    last = max(int(k.split("resblocks.")[1].split(".")[0]) for k in shapes if "resblocks." in k)
    assert f"lora_te2_text_model_encoder_layers_{last}_self_attn_q_proj" in names  # bigG's last block counts in SDXL
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                             "lora_te1_text_model_", "lora_te2_text_model_")) for n in names)
    assert not any("down_blocks" in n or "mid_block" in n or n.startswith("lora_te_") for n in names)
    # norms and label_emb are mapped (LyCORIS full/norm modules) but are no LoRA targets
    assert not lmap["lora_unet_input_blocks_1_0_in_layers_0"].lora_target
    assert any(n.startswith("lora_unet_label_emb_") for n in lmap)


def test_merge_into_sdxl_checkpoint_is_base_plus_ratio_delta(tmp_path, base):
    path, state = base
    g = ls.gen(5)
    d = state[IN_PROJ].shape[0] // 3
    net = {}
    net.update(_lora(Q_NAME, state[Q].shape, 4, g, alpha=2.0))
    net.update(_lora(CONV_NAME, state[CONV].shape, 2, g))
    net.update(_lora(TE1_NAME, state[TE1].shape, 4, g))
    net.update(_lora(TE2_V_NAME, (d, state[IN_PROJ].shape[1]), 4, g, alpha=1.0))
    net.update(_lora(TE2_FC1_NAME, state[TE2_FC1].shape, 3, g))
    lora_path = tmp_path / "sdxl_lora.safetensors"
    save_lora_file(lora_path, net, {"ss_base_model_version": "sdxl_base_v1-0"})
    out = tmp_path / "merged.safetensors"
    report = merge_networks_into_checkpoint_file(path, [lora_path], [0.7], out)
    assert report.merged[str(lora_path)] == 5 and report.unmatched[str(lora_path)] == []
    merged = load_file(str(out))
    assert set(merged) == set(state)
    for key, name in ((Q, Q_NAME), (CONV, CONV_NAME), (TE1, TE1_NAME), (TE2_FC1, TE2_FC1_NAME)):
        want = state[key] + 0.7 * _delta(net, name).reshape(state[key].shape)
        torch.testing.assert_close(merged[key], want, rtol=1e-5, atol=1e-6)
    want = state[IN_PROJ].clone()
    want[2 * d:] += 0.7 * _delta(net, TE2_V_NAME)
    torch.testing.assert_close(merged[IN_PROJ], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(merged[IN_PROJ][: 2 * d], state[IN_PROJ][: 2 * d])  # q and k rows untouched
    changed = {Q, CONV, TE1, TE2_FC1, IN_PROJ}
    for key, value in state.items():
        assert merged[key].dtype == value.dtype
        if key not in changed:
            assert torch.equal(merged[key], value), key


def test_merge_keeps_half_precision_and_refuses_sd1_networks(tmp_path, base):
    path, state = base
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    half_path = tmp_path / "half.safetensors"
    save_file(half, str(half_path))
    g = ls.gen(6)
    net = _lora(Q_NAME, state[Q].shape, 4, g)
    lora_path = tmp_path / "l.safetensors"
    save_lora_file(lora_path, net, {})
    out = tmp_path / "out.safetensors"
    merge_lycoris_file(half_path, lora_path, out, weight=1.0)
    merged = load_file(str(out))
    assert all(merged[k].dtype == half[k].dtype for k in half)
    torch.testing.assert_close(merged[Q].float(), (half[Q].float() + _delta(net, Q_NAME)).half().float())
    # an SD1 LoRA (lora_te_ and diffusers mid_block names that SDXL does not have) matches nothing
    sd1 = ls.lora("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 64, 64, 4)
    sd1_path = tmp_path / "sd1.safetensors"
    save_lora_file(sd1_path, sd1, {})
    with pytest.raises(ConfigError, match="SD1/SD2"):
        merge_lycoris_file(path, sd1_path, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(ConfigError, match="SDXL"):
        merge_lycoris_file(path, lora_path, tmp_path / "bad.safetensors", v2=True)


def test_lycoris_merge_into_sdxl_checkpoint(tmp_path, base):
    path, state = base
    g = ls.gen(7)
    out_f, in_f = state[Q].shape
    net = ls.loha(Q_NAME, out_f, in_f, 4, alpha=2.0, g=g)
    net.update(ls.loha(TE2_FC1_NAME, *state[TE2_FC1].shape, 2, alpha=2.0, g=g))
    # diffusers-spelled SDXL UNet name: accepted as an alias of the SGM name
    fc2 = U + "input_blocks.5.1.transformer_blocks.0.ff.net.2.weight"
    net.update(ls.lora("lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_ff_net_2", *state[fc2].shape, 2, g=g))
    lyco = tmp_path / "loha.safetensors"
    save_lora_file(lyco, net, {})
    out = tmp_path / "out.safetensors"
    report = merge_lycoris_file(path, lyco, out, weight=0.5)
    assert report.merged[str(lyco)] == 3
    merged = load_file(str(out))
    w = (net[f"{Q_NAME}.hada_w1_a"] @ net[f"{Q_NAME}.hada_w1_b"]) * (net[f"{Q_NAME}.hada_w2_a"] @ net[f"{Q_NAME}.hada_w2_b"])
    torch.testing.assert_close(merged[Q], state[Q] + 0.5 * 0.5 * w, rtol=1e-5, atol=1e-6)
    n = TE2_FC1_NAME
    w = (net[f"{n}.hada_w1_a"] @ net[f"{n}.hada_w1_b"]) * (net[f"{n}.hada_w2_a"] @ net[f"{n}.hada_w2_b"])
    torch.testing.assert_close(merged[TE2_FC1], state[TE2_FC1] + 0.5 * w, rtol=1e-5, atol=1e-6)
    n = "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_ff_net_2"
    torch.testing.assert_close(merged[fc2], state[fc2] + 0.5 * _delta(net, n), rtol=1e-5, atol=1e-6)


def test_extract_between_sdxl_checkpoints_then_merge_reconstructs(tmp_path, base):
    path, state = base
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    lmap = build_lora_map(shapes)
    names = lora_target_names(lmap, conv=True, shapes=shapes)
    g = ls.gen(8)
    truth = {}
    for i, name in enumerate(names):
        if i % 3:
            continue
        t = lmap[name]
        shape = shapes[t.weight_key]
        if t.rows is not None:
            shape = (t.rows[1] - t.rows[0],) + shape[1:]
        truth.update(_lora(name, shape, 2, g, scale=0.2))
    modules = {k.split(".")[0] for k in truth}
    assert any(n.startswith("lora_te2_") and n.endswith(("_q_proj", "_k_proj", "_v_proj")) for n in modules)
    truth_path = tmp_path / "truth.safetensors"
    save_lora_file(truth_path, truth, {})
    tuned_path = tmp_path / "tuned.safetensors"
    merge_lycoris_file(path, truth_path, tuned_path)
    out = tmp_path / "extracted.safetensors"
    result = extract_lora_file(path, tuned_path, out, linear_param=4, conv_param=4, min_diff=1e-6)
    sd, md = load_lora_file(out)
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["ss_v2"] == "False"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert md["modelspec.resolution"].startswith("1024")
    got = {k.split(".")[0] for k in sd}
    want = {k.split(".")[0] for k in truth}
    assert got == want
    assert any(n.startswith("lora_te1_") for n in got) and any(n.startswith("lora_te2_") for n in got)
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                             "lora_te1_", "lora_te2_")) for n in got)
    assert max(m.rel_error for m in result.modules) < 1e-4
    # merging the extraction back gives the tuned checkpoint
    rebuilt = tmp_path / "rebuilt.safetensors"
    merge_lycoris_file(path, out, rebuilt)
    rebuilt_sd, tuned = load_file(str(rebuilt)), load_file(str(tuned_path))
    assert set(rebuilt_sd) == set(tuned)
    for key in tuned:
        torch.testing.assert_close(rebuilt_sd[key], tuned[key], rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="SDXL"):
        extract_lora_file(path, tuned_path, tmp_path / "bad.safetensors", v2=True)


def test_merge_sdxl_loras_together_and_resize_keep_names(tmp_path, base):
    _, state = base
    g = ls.gen(9)
    d = state[IN_PROJ].shape[0] // 3
    md = {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
          "ss_network_dim": "8", "ss_network_alpha": "4.0", "ss_network_module": "networks.lora"}
    nets = []
    for i in range(2):
        net = {}
        net.update(_lora(Q_NAME, state[Q].shape, 8, g, alpha=4.0))
        net.update(_lora(CONV_NAME, state[CONV].shape, 8, g, alpha=4.0))
        net.update(_lora(TE1_NAME, state[TE1].shape, 8, g, alpha=4.0))
        net.update(_lora(TE2_V_NAME, (d, state[IN_PROJ].shape[1]), 8, g, alpha=4.0))
        p = tmp_path / f"n{i}.safetensors"
        save_lora_file(p, net, md)
        nets.append((p, net))
    names = {Q_NAME, CONV_NAME, TE1_NAME, TE2_V_NAME}
    merged_path = tmp_path / "merged.safetensors"
    merge_lora_files([p for p, _ in nets], [0.6, -0.3], merged_path, concat=True)
    sd, out_md = load_lora_file(merged_path)
    assert {k.split(".")[0] for k in sd} == names
    assert out_md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert out_md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    for name in names:
        want = 0.6 * _delta(nets[0][1], name) - 0.3 * _delta(nets[1][1], name)
        torch.testing.assert_close(_delta(sd, name), want, rtol=1e-4, atol=1e-6)
    resized = tmp_path / "resized.safetensors"
    resize_lora_file(nets[0][0], resized, new_rank=4)
    rs, rmd = load_lora_file(resized)
    assert {k.split(".")[0] for k in rs} == names
    assert all(rs[f"{n}.lora_down.weight"].shape[0] == 4 for n in names)
    assert rmd["ss_base_model_version"] == "sdxl_base_v1-0" and rmd["ss_network_dim"] == "4"
    # the resized file still merges into the SDXL checkpoint
    ckpt = tmp_path / "ckpt.safetensors"
    merge_networks_into_checkpoint_file(base[0], [resized], [1.0], ckpt)
    assert json.loads(load_file_metadata(ckpt)["merged_networks"])[0]["ratio"] == 1.0


def load_file_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_command_lines_on_sdxl(tmp_path, base):
    """locon_extract.py and lora_merge.py --sd_model as subprocesses on tiny SDXL single files."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(root))

    def run(tool, *args):
        proc = subprocess.run([sys.executable, str(root / "scripts" / f"{tool}.py"), *map(str, args)], env=env,
                              cwd=root, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc

    path, state = base
    g = ls.gen(11)
    d = state[IN_PROJ].shape[0] // 3
    net = {}
    net.update(_lora(Q_NAME, state[Q].shape, 2, g, scale=0.3))
    net.update(_lora(TE2_V_NAME, (d, state[IN_PROJ].shape[1]), 2, g, scale=0.3))
    lora_path = tmp_path / "l.safetensors"
    save_lora_file(lora_path, net, {})
    tuned = tmp_path / "tuned.safetensors"
    run("lora_merge", "--models", lora_path, "--ratios", 0.8, "--sd_model", path, "--save_to", tuned)
    tuned_sd = load_file(str(tuned))
    torch.testing.assert_close(tuned_sd[Q], state[Q] + 0.8 * _delta(net, Q_NAME), rtol=1e-5, atol=1e-6)
    extracted = tmp_path / "x.safetensors"
    run("locon_extract", "--base", path, "--tuned", tuned, "--save_to", extracted, "--linear_param", 4)
    sd, md = load_lora_file(extracted)
    assert {k.split(".")[0] for k in sd} == {Q_NAME, TE2_V_NAME}
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"
    torch.testing.assert_close(_delta(sd, TE2_V_NAME), 0.8 * _delta(net, TE2_V_NAME), rtol=1e-3, atol=1e-5)
