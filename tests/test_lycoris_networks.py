"""LyCORIS networks (network_module lycoris.kohya): every algo trains through the training loop, saves
kohya-named files that lycoris-lora reads back, LoCon files load in diffusers; presets, typed
network_args, 2023 names, continuing from a file; every bad input is one ConfigError naming it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sd_scripts.core.errors import ConfigError
from sd_scripts.networks import lycoris_adapter as la
from sd_scripts.networks.factory import check_network_settings, plan_network
from sd_scripts.networks.network_args import split_network_args
from tests.helpers import make_dataset, modules_of, tiny_config

ROOT = Path(__file__).resolve().parents[1]

# algo -> (network_args, tensor parts every module of that algo has)
ALGOS = {
    "lora": (["algo=lora", "conv_dim=4", "conv_alpha=1"], {"lora_down.weight", "lora_up.weight", "alpha"}),
    "loha": (["algo=loha"], {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
    "lokr": (["algo=lokr", "factor=4"], {"lokr_w1", "alpha"}),
    "ia3": (["algo=ia3", "preset=ia3"], {"weight", "on_input"}),
    "dylora": (["algo=dylora", "block_size=2"], {"lora_down.weight", "lora_up.weight", "alpha"}),
    "full": (["algo=full", "preset=attn-mlp"], {"diff"}),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("lyco_data") / "data", count=2)


def _components(seed: int = 0):
    from sd_scripts.testing.tiny_models import build_tiny_components

    parts = build_tiny_components("sd1", seed=seed)
    return parts["unet"], parts["text_encoder"]


def _models_from(folder: Path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return (UNet2DConditionModel.from_pretrained(str(folder / "unet")),
            CLIPTextModel.from_pretrained(str(folder / "text_encoder")))


def _build(args, unet=None, te=None, dim=4, alpha=2.0, **kw):
    if unet is None:
        unet, te = _components()
    parsed = la.parse_lycoris_args(split_network_args(args), network_dim=dim, network_alpha=alpha)
    tes = te if isinstance(te, list) else [te]
    net, warnings = la.create_lycoris_network(unet, tes, parsed, network_dim=dim, network_alpha=alpha, **kw)
    net.apply_to()
    return net, warnings


# --------------------------------------------------------------------------- every algo, end to end

@pytest.mark.parametrize("algo", list(ALGOS))
def test_algo_trains_saves_and_reloads_in_lycoris(algo, tiny_sd1_diffusers, dataset, tmp_path):
    from sd_scripts.training.loop import train
    import lycoris.kohya as kohya

    args, parts = ALGOS[algo]
    lr = 1e-2 if algo == "ia3" else 1e-3
    result = train(tiny_config(tiny_sd1_diffusers, dataset, tmp_path / "out", network_module="lycoris.kohya",
                               network_args=args, max_train_steps=2, train_batch_size=1, learning_rate=lr))
    sd = load_file(result.output_path)
    modules = modules_of(sd)
    assert modules, "the file must hold LyCORIS modules"
    # kohya / A1111 / ComfyUI names, whatever transformers calls its CLIP modules
    assert all(name.startswith(("lora_unet_", "lora_te_text_model_encoder_")) for name in modules), sorted(modules)[:3]
    assert any(name.startswith("lora_te_") for name in modules) and any(name.startswith("lora_unet_") for name in modules)
    for name, have in modules.items():
        assert parts <= have, (name, have)
    if algo in ("loha", "lokr", "lora", "dylora"):
        assert all(sd[f"{n}.alpha"].dim() == 0 for n in modules)
    with safe_open(result.output_path, "pt") as f:
        md = f.metadata()
    assert md["ss_network_module"] == "lycoris.kohya"
    assert json.loads(md["ss_network_args"]) == split_network_args(args)
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2.0"
    assert all(torch.isfinite(v.float()).all() for v in sd.values())

    # training moved the weights
    moving = {"lora": "lora_up.weight", "loha": "hada_w2_a", "lokr": "lokr_w1", "ia3": "weight",
              "dylora": "lora_up.weight", "full": "diff"}[algo]
    assert any(float(sd[f"{n}.{moving}"].abs().max()) > 0 for n in modules if f"{n}.{moving}" in sd)

    # reload with lycoris-lora, names mapped back to the installed transformers' spelling
    unet, te = _models_from(tiny_sd1_diffusers)
    renamed = la.to_lycoris_state_dict(sd, la.file_to_lycoris_names(unet, [te]))
    preset = la.builtin_preset(dict(a.split("=") for a in args).get("preset", "full"))
    with la.lycoris_preset(preset) as preset_name:
        if algo == "ia3":
            # lycoris 4.1.3 create_network_from_weights raises TypeError on IA3 files (IA3Module bug):
            # rebuild with create_network and load the file strictly instead.
            net = kohya.create_network(1.0, 4, 2.0, None, te, unet, warn_on_unmatched=False, algo="ia3",
                                       preset=preset_name)
            net.apply_to(te, unet, True, True)
            assert not net.load_state_dict(renamed, strict=False).unexpected_keys
        else:
            net, _ = kohya.create_network_from_weights(1.0, None, None, te, unet, weights_sd=renamed)
            net.apply_to(te, unet, True, True)
    reloaded = net.state_dict()
    assert set(reloaded) == set(renamed)
    for key, value in renamed.items():
        name = key.partition(".")[0]
        if key.endswith(".alpha") and algo == "lokr" and not any(f"{name}.{p}" in renamed for p in ("lokr_w1_a", "lokr_w2_a")):
            continue  # both Kronecker factors full: scale is 1 whatever alpha says, and LyCORIS rebuilds it as 1
        got = reloaded[key].detach().float()
        assert torch.allclose(got.reshape(value.shape), value.float(), atol=1e-6), key


def test_locon_file_loads_in_diffusers_like_a_hand_merge(tiny_sd1_diffusers, dataset, tmp_path):
    """A LoCon (3x3 convs, conv_in/out, time embedding, attention) loads in diffusers and gives the
    image of the file merged into the weights by hand."""
    from diffusers import StableDiffusionPipeline
    from torch import nn

    from sd_scripts.training.loop import train
    from sd_scripts.files import lora_keys
    from sd_scripts.networks.lora import lora_delta_weight

    result = train(tiny_config(tiny_sd1_diffusers, dataset, tmp_path / "out", network_module="lycoris.kohya",
                               network_args=["algo=locon", "conv_dim=2", "conv_alpha=1"], max_train_steps=2,
                               train_batch_size=1, learning_rate=5e-2))
    sd = load_file(result.output_path)
    names = set(modules_of(sd))
    assert {"lora_unet_conv_in", "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_time_embedding_linear_1"} <= names
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[:2] == (2, 32)

    def pipe():
        p = StableDiffusionPipeline.from_pretrained(str(tiny_sd1_diffusers), safety_checker=None, local_files_only=True)
        p.set_progress_bar_config(disable=True)
        return p

    def image(p):
        g = torch.Generator().manual_seed(0)
        return p("sks shape, red", num_inference_steps=2, height=64, width=64, generator=g, output_type="np").images[0]

    base_pipe = pipe()
    base = image(base_pipe)
    base_pipe.load_lora_weights(str(result.output_path))
    loaded = image(base_pipe)

    merged_pipe = pipe()
    found, missing = lora_keys.resolve_names(names, {"lora_unet": merged_pipe.unet, "lora_te": merged_pipe.text_encoder},
                                             (nn.Linear, nn.Conv2d))
    assert not missing
    roots = {"lora_unet": dict(merged_pipe.unet.named_modules()), "lora_te": dict(merged_pipe.text_encoder.named_modules())}
    with torch.no_grad():
        for name, (prefix, path) in found.items():
            down, up = sd[f"{name}.lora_down.weight"].float(), sd[f"{name}.lora_up.weight"].float()
            weight = roots[prefix][path].weight
            weight += lora_delta_weight(down, up, float(sd[f"{name}.alpha"]) / down.shape[0]).reshape(weight.shape)
    merged = image(merged_pipe)
    assert abs(loaded - base).max() > 1e-4, "the LoCon must change the image"
    assert abs(loaded - merged).max() < 1e-4


# --------------------------------------------------------------------------- presets

def test_presets_build_on_diffusers_unet():
    import lycoris.kohya as kohya

    before = {a: getattr(kohya.LycorisNetworkKohya, a) for a in ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                                                                  "ENABLE_CONV", "USE_FNMATCH", "NAME_ALGO_MAP")}
    counts = {}
    for preset in la.LYCORIS_PRESETS:
        net, _ = _build([f"preset={preset}"] + (["algo=ia3"] if preset == "ia3" else []))
        unet_names = {lora.lora_name for lora in net.unet_loras}
        te_names = {lora.lora_name for lora in net.text_encoder_loras}
        assert len(unet_names) == len(net.unet_loras) and len(te_names) == len(net.text_encoder_loras)
        counts[preset] = (len(unet_names), len(te_names))
        if preset in ("full", "full-lin", "unet-only"):
            assert "lora_unet_time_embedding_linear_1" in unet_names  # named by the preset, adapted once
        if preset in ("attn-mlp", "unet-transformer-only", "attn-only"):
            assert not any("time_embedding" in n for n in unet_names)
        if preset == "attn-only":
            assert unet_names and all("attn" in n for n in unet_names)
        if preset == "ia3":
            assert unet_names and all(n.endswith(("to_k", "to_v", "ff_net_2")) for n in unet_names)
            on_input = {lora.lora_name: int(lora.on_input) for lora in net.loras}
            assert on_input["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"] == 1
            assert on_input["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"] == 0
            assert any(n.endswith("mlp_fc2") and v == 1 for n, v in on_input.items())
    assert counts["full"] == (83, 18) and counts["attn-mlp"] == (48, 18) and counts["unet-only"] == (83, 0)
    assert counts["full-lin"][0] < counts["full"][0] and counts["unet-convblock-only"][1] == 0
    # LyCORIS's class-level preset state is put back
    after = {a: getattr(kohya.LycorisNetworkKohya, a) for a in before}
    assert after == before


def test_preset_toml_file(tmp_path):
    preset = tmp_path / "mine.toml"
    preset.write_text('enable_conv = false\nunet_target_module = ["Transformer2DModel"]\n'
                      'text_encoder_target_module = []\n', encoding="utf-8")
    net, _ = _build([f"preset={preset}"])
    assert net.unet_loras and not net.text_encoder_loras
    assert not any("resnets" in lora.lora_name for lora in net.unet_loras)


def test_conv_dim_zero_and_conv_alpha_zero():
    net, _ = _build(["conv_dim=0"])
    assert not any(lora.lora_name.endswith("conv1") for lora in net.unet_loras)
    net, _ = _build(["conv_dim=2", "conv_alpha=0"])
    sd = net.kohya_state_dict()
    assert float(sd["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 2.0  # alpha 0 = rank
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[0] == 2


# --------------------------------------------------------------------------- network_args values

def test_string_values_become_real_values():
    parsed = la.parse_lycoris_args({"algo": "LoKr", "decompose_both": "False", "use_scalar": "0", "dora_wd": "yes",
                                    "factor": "8", "conv_dim": "8", "conv_alpha": "4", "dropout": "0.1",
                                    "constrain": "0.5"})
    kw = parsed.kwargs
    assert kw["algo"] == "lokr"
    assert kw["decompose_both"] is False and kw["use_scalar"] is False and kw["dora_wd"] is True
    assert kw["factor"] == 8 and isinstance(kw["factor"], int)
    assert kw["conv_dim"] == 8 and kw["conv_alpha"] == 4.0 and "dropout" not in kw  # LoKr: see below
    assert kw["constraint"] == 0.5
    assert la.parse_lycoris_args({"dropout": "0.1"}).kwargs["dropout"] == 0.1
    # network_dropout fills dropout when network_args has none (as kohya's trainer)
    assert la.parse_lycoris_args({}, network_dropout=0.2).kwargs["dropout"] == 0.2
    assert la.parse_lycoris_args({"dropout": "0.05"}, network_dropout=0.2).kwargs["dropout"] == 0.05


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_dropout_with_loha_lokr_is_one_warning(algo, capsys):
    """LyCORIS ignores neuron dropout in LoHa/LoKr and prints a line per module: the engine drops it with one warning."""
    parsed = la.parse_lycoris_args({"algo": algo, "rank_dropout": "0.1"}, network_dropout=0.2)
    assert "dropout" not in parsed.kwargs and parsed.kwargs["rank_dropout"] == 0.1
    assert [w for w in parsed.warnings if "dropout" in w] == [
        f"network_args: dropout (network_dropout) does nothing with algo={algo}; use rank_dropout or module_dropout"]
    _build([f"algo={algo}", "dropout=0.1"])
    assert "dropout" not in capsys.readouterr().out


@pytest.mark.parametrize("args, tucker", [
    (["disable_conv_cp=True"], False),  # 2023: "CP decomposition? no"
    (["disable_conv_cp=False"], True),
    (["use_conv_cp=True"], True),  # 2023: "CP decomposition? yes"
    (["use_cp=true"], True),
    (["cp_decomp=True"], True),
    (["use_tucker=0"], False),
    (["use_tucker=True", "use_conv_cp=True"], True),
])
def test_old_tucker_names_mean_what_users_meant(args, tucker):
    parsed = la.parse_lycoris_args(split_network_args(args))
    assert parsed.kwargs["use_tucker"] is tucker
    net, _ = _build(args + ["conv_dim=4"])
    has_mid = any(k.endswith("lora_mid.weight") for k in net.kohya_state_dict())
    assert has_mid is tucker


def test_loraplus_groups_and_zero_lr():
    net, _ = _build(["loraplus_unet_lr_ratio=16"])
    groups, names = net.prepare_optimizer_params(0, 1e-4, 1e-3)
    assert names == ["unet", "unet plus"]
    assert groups[0]["lr"] == 1e-4 and groups[1]["lr"] == pytest.approx(1.6e-3)
    assert all(not p.requires_grad for lora in net.text_encoder_loras for p in lora.parameters())


# --------------------------------------------------------------------------- continuing from a file

def test_network_weights_continue_and_mismatch():
    unet, te = _components()
    loha, _ = _build(["algo=loha"], unet, te)
    with torch.no_grad():
        for p in loha.parameters():
            p.add_(0.01)
    sd = loha.kohya_state_dict()
    unet2, te2 = _components()
    again, _ = _build(["algo=loha"], unet2, te2)
    again.load_kohya_state_dict(sd, strict=True)
    sd2 = again.kohya_state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    # the flattened text-encoder spelling (files from other tools on transformers 5.6+) loads too
    flat = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in sd.items()}
    again.load_kohya_state_dict(flat, strict=True)

    unet3, te3 = _components()
    locon, _ = _build(["algo=lora"], unet3, te3)
    with pytest.raises(ConfigError, match="network_weights.*hada_w") as err:
        locon.load_kohya_state_dict(sd)
    assert err.value.setting == "network_weights"
    unet4, te4 = _components()
    wide, _ = _build(["algo=loha"], unet4, te4, dim=8)
    with pytest.raises(ConfigError, match="network_weights.*shape"):
        wide.load_kohya_state_dict(sd)


def test_dim_from_weights_and_full_reload():
    unet, te = _components()
    net, _ = _build(["algo=lora", "conv_dim=2"], unet, te, dim=8)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    sd = net.kohya_state_dict()
    unet2, te2 = _components()
    parsed = la.parse_lycoris_args({"algo": "lora"})
    again, _ = la.lycoris_network_from_weights(sd, unet2, [te2], parsed)
    again.apply_to()
    again.load_kohya_state_dict(sd, strict=True)
    assert all(torch.equal(sd[k], again.kohya_state_dict()[k]) for k in sd)

    # full: the file's diff is loaded once (LyCORIS adds it to the current weight)
    unet3, te3 = _components()
    full, _ = _build(["algo=full", "preset=attn-mlp"], unet3, te3)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.5)
    diff = full.kohya_state_dict()
    full.load_kohya_state_dict(diff)
    full.load_kohya_state_dict(diff)
    assert all(torch.allclose(diff[k], full.kohya_state_dict()[k]) for k in diff)


# --------------------------------------------------------------------------- bad input

def _config(tmp_path, **kw):
    return tiny_config(tmp_path / "model", tmp_path / "data", tmp_path / "out", **kw)


@pytest.mark.parametrize("module, args, setting, needle", [
    ("lycoris.kohya", ["algo=lorax"], "network_args", "algo=lorax"),
    ("lycoris.kohya", ["algo=tlora"], "network_args", "algo=tlora"),
    ("lycoris.kohya", ["preset=everything"], "network_args", "preset=everything"),
    ("lycoris.kohya", ["preset=/nope/preset.toml"], "network_args", "preset"),
    ("lycoris.kohya", ["use_tucker=maybe"], "network_args", "use_tucker=maybe"),
    ("lycoris.kohya", ["conv_dim=four"], "network_args", "conv_dim=four"),
    ("lycoris.kohya", ["conv_alpha=-1"], "network_args", "conv_alpha"),
    ("lycoris.kohya", ["dropout=1.5"], "network_args", "dropout=1.5"),
    ("lycoris.kohya", ["factor=0"], "network_args", "factor=0"),
    ("lycoris.kohya", ["algo=dylora", "block_size=3"], "network_args", "block_size=3"),
    ("lycoris.kohya", ["algo=glora", "use_tucker=true"], "network_args", "use_tucker"),
    ("lycoris.kohya", ["algo=full", "bypass_mode=true"], "network_args", "bypass_mode"),
    ("lycoris.kohya", ["use_tucker=true", "disable_conv_cp=true"], "network_args", "disable_conv_cp"),
    ("lycoris.kohya", ["loraplus_lr_ratio=0"], "network_args", "loraplus_lr_ratio"),
    ("lycoris.kohya", ["conv_dim"], "network_args", "conv_dim"),
    ("lycoris.kohyaa", [], "network_module", "lycoris.kohyaa"),
])
def test_bad_lycoris_settings_name_the_setting(tmp_path, module, args, setting, needle):
    config = _config(tmp_path, network_module=module, network_args=args)
    with pytest.raises(ConfigError) as err:
        check_network_settings(config)
    assert err.value.setting == setting and needle in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(setting + ":")


def test_bad_preset_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("enable_conv = [", encoding="utf-8")
    with pytest.raises(ConfigError, match="network_args: preset=.*TOML"):
        check_network_settings(_config(tmp_path, network_module="lycoris.kohya", network_args=[f"preset={bad}"]))
    odd = tmp_path / "odd.toml"
    odd.write_text("unet_targets = []\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown keys unet_targets"):
        check_network_settings(_config(tmp_path, network_module="lycoris.kohya", network_args=[f"preset={odd}"]))


def test_warnings_for_ignored_args(tmp_path):
    warnings = check_network_settings(_config(tmp_path, network_module="lycoris.kohya",
                                              network_args=["algo=loha", "down_lr_weight=sine", "colour=red",
                                                            "disable_conv_cp=True"]))
    text = " | ".join(warnings)
    assert "down_lr_weight" in text and "colour" in text and "use_tucker=False" in text
    plan = plan_network(_config(tmp_path, network_module="lycoris.kohya", network_args=["algo=loha"]))
    assert plan.kind == "lycoris" and plan.lycoris.algo == "loha"
    # LyCORIS settings given to kohya's LoRA: say which network_module they need
    warnings = check_network_settings(_config(tmp_path, network_module="networks.lora", network_args=["algo=loha"]))
    assert len(warnings) == 1 and "algo" in warnings[0] and "lycoris.kohya" in warnings[0]


def test_check_network_settings_is_cheap():
    code = ("import sys; from sd_scripts.networks.factory import check_network_settings\n"
            "from types import SimpleNamespace as N\n"
            "c = N(network_module='lycoris.kohya', network_args=['algo=loha','use_tucker=1'], network_dim=8,"
            " network_alpha=4, network_dropout=None, network_train_text_encoder_only=False)\n"
            "check_network_settings(c)\n"
            "c = N(network_module='networks.lora', network_args=['down_lr_weight=sine','block_dims=' + ','.join(['4']*25)],"
            " network_dim=8, network_alpha=4, network_dropout=None, network_train_text_encoder_only=False)\n"
            "check_network_settings(c)\n"
            "assert 'torch' not in sys.modules and 'lycoris' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:3]\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_cli_bad_algo_exit_2_before_the_model_loads(tmp_path):
    """An unknown algo stops the command line with one error line and exit code 2 (the model path
    does not even exist, so nothing was loaded)."""
    import os

    data = make_dataset(tmp_path / "data", count=1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "sd_scripts.train_network", "--pretrained_model_name_or_path",
                           str(tmp_path / "model"), "--train_data_dir", str(data), "--output_dir", str(tmp_path / "out"),
                           "--network_module", "lycoris.kohya", "--network_args", "algo=lohaa"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert any(line.startswith("error:") and "algo=lohaa" in line for line in proc.stderr.splitlines()), proc.stderr


def test_sdxl_lycoris_names_and_reload():
    """SDXL: lora_te1/lora_te2 with kohya's text_model spelling, UNet in the SGM layout of kohya's SDXL
    files, one lr group per text encoder; the file reloads into a network built from its shapes."""
    from sd_scripts.models.sdxl_names import sgm_path_mapper
    from sd_scripts.testing.tiny_models import build_tiny_components

    parts = build_tiny_components("sdxl", seed=0)
    unet, tes = parts["unet"], [parts["text_encoder"], parts["text_encoder_2"]]
    prefixes = ("lora_te1", "lora_te2")
    net, _ = _build(["algo=loha"], unet, tes, te_prefixes=prefixes, unet_path_map=sgm_path_mapper(unet))
    sd = net.kohya_state_dict()
    names = set(modules_of(sd))
    assert any(n.startswith("lora_te1_text_model_encoder_") for n in names)
    assert any(n.startswith("lora_te2_text_model_encoder_") for n in names)
    unet_names = [n for n in names if n.startswith("lora_unet_")]
    assert unet_names and all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                            "lora_unet_output_blocks_", "lora_unet_time_embed_", "lora_unet_out_"))
                              for n in unet_names), sorted(unet_names)[:5]
    _, group_names = net.prepare_optimizer_params([1e-4, 2e-4], None, 1e-3)
    assert group_names == ["textencoder1", "textencoder2", "unet"]
    again, _ = la.lycoris_network_from_weights(sd, unet, tes, la.parse_lycoris_args({"algo": "loha"}),
                                               te_prefixes=prefixes, unet_path_map=sgm_path_mapper(unet))
    assert {lora.lora_name for lora in again.loras} == {lora.lora_name for lora in net.loras}


@pytest.mark.parametrize("args", [["algo=lora", "use_scalar=true"], ["algo=loha", "use_tucker=true"], ["algo=lokr"],
                                  ["algo=ia3", "preset=ia3"], ["algo=dylora"], ["algo=full", "preset=attn-mlp"],
                                  ["algo=lora", "dora_wd=true"], ["algo=glora"], ["algo=diag-oft"], ["algo=boft"]])
def test_state_dict_round_trip_is_exact(args):
    """network.state_dict() / load_state_dict() (what save_state / resume use) restore every module
    bit for bit, also where LyCORIS's own state dict is computed (full) or not loadable (DyLoRA)."""
    net, _ = _build(args)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    state = net.state_dict()
    assert state and all(not k.startswith("lycoris.") for k in state)
    other, _ = _build(args)
    other.load_state_dict(state)
    assert all(torch.equal(state[k], v) for k, v in other.state_dict().items())
    a, b = net.kohya_state_dict(), other.kohya_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RuntimeError):
        other.load_state_dict({k: v for k, v in list(state.items())[1:]})


@pytest.mark.parametrize("module, args", [
    ("lycoris.kohya", ["algo=full", "preset=attn-mlp"]),
    ("lycoris.kohya", ["algo=dylora", "block_size=2", "rank_dropout=0.1"]),
    ("networks.dylora", ["unit=2"]),
])
def test_resume_is_bit_identical(module, args, tiny_sd1_diffusers, tmp_path):
    """save_state + resume with these networks ends with the same file as an uninterrupted run."""
    from sd_scripts.training.loop import train

    data = make_dataset(tmp_path / "data", folder="1_sks shape", count=2)
    common = dict(network_module=module, network_args=args, max_train_steps=4, train_batch_size=1)
    ref = train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "ref", save_state=True, save_every_n_steps=2, **common))
    resumed = train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "resumed",
                                resume=str(tmp_path / "ref" / "tiny-step00000002-state"), **common))
    a, b = load_file(ref.output_path), load_file(resumed.output_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("algo", ["glora", "diag-oft", "boft"])
def test_other_algos_save_and_reload(algo):
    """The further LyCORIS algorithms accepted here: kohya names, and lycoris-lora rebuilds them from the file."""
    net, _ = _build([f"algo={algo}", "preset=attn-mlp"])
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    sd = net.kohya_state_dict()
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in sd)
    unet, te = _components()
    again, _ = la.lycoris_network_from_weights(sd, unet, [te], la.parse_lycoris_args({"algo": algo, "preset": "attn-mlp"}))
    again.apply_to()
    again.load_kohya_state_dict(sd, strict=True)
    sd2 = again.kohya_state_dict()
    assert sd.keys() == sd2.keys() and all(torch.allclose(sd[k], sd2[k]) for k in sd)
