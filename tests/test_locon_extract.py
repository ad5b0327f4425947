"""Contracts of LoRA/LoCon extraction from two checkpoints (sd_scripts/networks/extract.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sd_scripts.core.errors import ConfigError
from sd_scripts.networks.extract import extract_lora_file, extract_network
from sd_scripts.networks.ldm_lora_map import build_lora_map
from sd_scripts.networks.lycoris_merge import NetworkInput, merge_into_checkpoint
from sd_scripts.networks.network_state import parse_network
from tests import lora_synth as ls


def _tuned(base, lora_sd, ratio=1.0):
    tuned = {k: v.clone() for k, v in base.items()}
    merge_into_checkpoint(tuned, [NetworkInput("truth", parse_network(lora_sd), ratio)])
    return tuned


@pytest.fixture(scope="module")
def sd1():
    base, _ = ls.ldm_checkpoint("sd1", seed=3)
    truth = ls.lora_for_checkpoint(base, rank=3, conv_rank=2, seed=4, alpha=1.5, scale=0.1)
    return base, truth, _tuned(base, truth)


def _targets(state):
    return build_lora_map({k: tuple(v.shape) for k, v in state.items()})


def test_extract_then_merge_reconstructs_the_delta(sd1):
    base, truth, tuned = sd1
    res = extract_network(base, tuned, "fixed", linear_param=3, conv_param=2)
    assert {m.name for m in res.modules} == {k.split(".")[0] for k in truth}
    assert all(m.rel_error < 1e-4 for m in res.modules)
    rebuilt = {k: v.clone() for k, v in base.items()}
    merge_into_checkpoint(rebuilt, [NetworkInput("extracted", parse_network(res.state_dict), 1.0)])
    for key in base:
        torch.testing.assert_close(rebuilt[key], tuned[key], rtol=1e-4, atol=2e-6)


def test_lower_rank_error_is_the_optimal_truncation_error(sd1):
    base, _, tuned = sd1
    res = extract_network(base, tuned, "fixed", linear_param=1, conv_param=1)
    lmap = _targets(base)
    extracted = parse_network(res.state_dict)
    for m in res.modules:
        key = lmap[m.name].weight_key
        delta = (tuned[key] - base[key]).double()
        w = delta.reshape(delta.shape[0], -1)
        s = torch.linalg.svdvals(w)
        best = float(torch.sqrt((s[1:] ** 2).sum() / (s ** 2).sum()))
        assert m.rank == 1 and m.rel_error == pytest.approx(best, rel=1e-3, abs=1e-6)
        got = extracted[m.name].delta(delta.shape).double()
        assert float((delta - got).norm() / delta.norm()) == pytest.approx(best, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("mode,lin,conv", [("threshold", 0.05, 0.02), ("ratio", 0.3, 0.5), ("quantile", 0.6, 0.9)])
def test_dynamic_modes_pick_lycoris_ranks(sd1, mode, lin, conv):
    base, _, tuned = sd1
    res = extract_network(base, tuned, mode, linear_param=lin, conv_param=conv)
    lmap = _targets(base)
    for m in res.modules:
        key = lmap[m.name].weight_key
        w = (tuned[key] - base[key]).reshape(tuned[key].shape[0], -1).double().numpy()
        s = np.linalg.svd(w, compute_uv=False)
        p = conv if m.conv else lin
        if mode == "threshold":
            want = int(np.sum(s > p))
        elif mode == "ratio":
            want = int(np.sum(s > p * s[0]))
        else:
            want = int(np.sum(np.cumsum(s) < p * np.sum(s) * (1 - 1e-9)))
        assert m.rank == max(1, want), (m.name, s[:6])


def test_text_encoder_modules_under_min_diff_are_skipped(sd1):
    base, truth, _ = sd1
    small = {k: (v * 0.05 if "lora_te" in k and "lora_up" in k else v) for k, v in truth.items()}
    tuned = _tuned(base, small)
    te_max = max(float((tuned[k] - base[k]).abs().max()) for k in base if k.startswith("cond_stage_model"))
    res = extract_network(base, tuned, "fixed", 3, 2, min_diff=te_max * 1.01)
    assert res.skipped_te and not any(m.part == "te" for m in res.modules)
    res = extract_network(base, tuned, "fixed", 3, 2, min_diff=te_max * 0.5)
    assert any(m.part == "te" for m in res.modules)


def test_no_conv_param_gives_a_plain_lora(sd1):
    base, _, tuned = sd1
    res = extract_network(base, tuned, "fixed", linear_param=2)
    assert res.modules and not any(m.conv for m in res.modules)
    assert all(v.dim() == 2 or v.shape[2:] == (1, 1) for k, v in res.state_dict.items() if k.endswith("weight"))


def test_forced_randomized_svd_reports_its_error(sd1):
    base, _, tuned = sd1
    exact = extract_network(base, tuned, "fixed", 2, 1, randomized=False)
    rnd = extract_network(base, tuned, "fixed", 2, 1, randomized=True)
    assert not any(m.exact for m in rnd.modules)
    for a, b in zip(exact.modules, rnd.modules):
        assert b.rel_error >= a.rel_error - 1e-6
        assert b.rel_error == pytest.approx(a.rel_error, abs=1e-3)


def test_sd2_packed_qkv_extraction():
    base, _ = ls.ldm_checkpoint("sd2", seed=5)
    truth = ls.lora_for_checkpoint(base, rank=2, seed=6, conv=False, every=5)
    tuned = _tuned(base, truth)
    res = extract_network(base, tuned, "fixed", linear_param=2)
    assert {m.name for m in res.modules} == {k.split(".")[0] for k in truth}
    assert any("self_attn_q_proj" in m.name or "self_attn_v_proj" in m.name or "self_attn_k_proj" in m.name
               for m in res.modules)
    rebuilt = {k: v.clone() for k, v in base.items()}
    merge_into_checkpoint(rebuilt, [NetworkInput("x", parse_network(res.state_dict), 1.0)])
    for key in base:
        torch.testing.assert_close(rebuilt[key], tuned[key], rtol=1e-4, atol=2e-6)


def test_bad_inputs(sd1, tmp_path):
    base, _, tuned = sd1
    with pytest.raises(ConfigError, match="nothing to extract"):
        extract_network(base, base, "fixed", 4)
    wrong = dict(tuned)
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    wrong[key] = torch.zeros(16, 32, 1, 1)
    with pytest.raises(ConfigError, match="different shapes"):
        extract_network(base, wrong, "fixed", 4)
    for mode, lin, conv in (("fixed", 0, None), ("fixed", -2, None), ("fixed", 4, -1), ("ratio", 1.5, None),
                            ("quantile", 0, None), ("blend", 1, None)):
        with pytest.raises(ConfigError):
            extract_network(base, tuned, mode, lin, conv)


def test_extract_file_metadata_and_diffusers_load(tmp_path, tiny_sd1_diffusers):
    from safetensors.torch import save_file

    from sd_scripts.files.lora_file import load_lora_file

    pipe, base = ls.pipeline_checkpoint(tiny_sd1_diffusers)
    truth = ls.lora_for_checkpoint(base, rank=3, conv_rank=2, seed=8, alpha=3.0)
    tuned = _tuned(base, truth)
    bp, tp = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    save_file(base, str(bp))
    save_file(tuned, str(tp))
    out = tmp_path / "x.safetensors"
    extract_lora_file(bp, tp, out, "fixed", 3, 2, save_precision="float")
    sd, md = load_lora_file(out)
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "3"
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False"
    assert json.loads(md["ss_network_args"])["conv_dim"] == "2"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    with pytest.raises(ConfigError, match="exists"):
        extract_lora_file(bp, tp, out, "fixed", 3, 2)
    with pytest.raises(ConfigError, match="is_v2"):
        extract_lora_file(bp, tp, tmp_path / "y.safetensors", "fixed", 3, 2, v2=True)
    ls.assert_diffusers_fuses_to(pipe, out, tuned)
