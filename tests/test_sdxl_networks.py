"""Every network type and a spread of optimizers train on a tiny SDXL model through ``train_loop.train``: kohya LoCon,
kohya DyLoRA and LyCORIS (locon, loha, lokr, ia3, dylora, full, glora, diag-oft, boft, DoRA) write SDXL files
(lora_te1_/lora_te2_, SGM UNet names, SDXL metadata) that load back value for value, whose every module ComfyUI places
and the checkpoint merge applies (DoRA, GLoRA and OFT/BOFT included); the optimizers move the weights; text-encoder
training gives each text encoder its own parameter group at text_encoder_lr."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.comfy_rules import comfy_key_map_sdxl, hf_text_encoder_shapes
from tests.helpers import make_dataset, modules_of, tiny_config

pytestmark = pytest.mark.slow

# case -> (network_module, network_args, tensor parts every module of the file has, the part(s) that start at zero
# and that training moves)
LORA_PARTS = {"lora_down.weight", "lora_up.weight", "alpha"}
NETWORKS = {
    "locon": ("networks.lora", ["conv_dim=2", "conv_alpha=1"], LORA_PARTS, "lora_up.weight"),
    "dylora": ("networks.dylora", ["unit=2"], LORA_PARTS, "lora_up.weight"),
    "lycoris-locon": ("lycoris.kohya", ["algo=locon", "conv_dim=2", "conv_alpha=1"], LORA_PARTS, "lora_up.weight"),
    "loha": ("lycoris.kohya", ["algo=loha", "conv_dim=2"],
             {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}, "hada_w2_a"),
    "lokr": ("lycoris.kohya", ["algo=lokr", "factor=4"], {"lokr_w1", "alpha"}, ("lokr_w2", "lokr_w2_b")),
    "ia3": ("lycoris.kohya", ["algo=ia3", "preset=ia3"], {"weight", "on_input"}, "weight"),
    "lycoris-dylora": ("lycoris.kohya", ["algo=dylora", "block_size=2"], LORA_PARTS, "lora_up.weight"),
    "full": ("lycoris.kohya", ["algo=full"], {"diff"}, "diff"),
    "glora": ("lycoris.kohya", ["algo=glora"], {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"},
              ("a2.weight", "b2.weight")),
    "diag-oft": ("lycoris.kohya", ["algo=diag-oft"], {"oft_blocks"}, "oft_blocks"),
    "boft": ("lycoris.kohya", ["algo=boft"], {"oft_blocks"}, "oft_blocks"),
    "dora": ("lycoris.kohya", ["algo=lora", "dora_wd=true"], LORA_PARTS | {"dora_scale"}, "lora_up.weight"),
}
# these train on the single-file model, the others on the diffusers folder
ON_SINGLE_FILE = ("loha", "dylora")
# SGM (checkpoint) spellings of UNet modules; the diffusers spellings must never appear in an SDXL file
SGM_UNET = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_", "lora_unet_time_embed_",
            "lora_unet_label_emb_", "lora_unet_out_")
DIFFUSERS_WORDS = re.compile(r"down_blocks|up_blocks|mid_block|attentions_|resnets_|time_embedding|conv_in|conv_out")
TE_PREFIXES = ("lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("xl_net_data") / "data", count=2)


@pytest.fixture(scope="module")
def comfy_map(tiny_sdxl_single_file, tiny_sdxl_diffusers) -> dict[str, tuple]:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with safe_open(str(tiny_sdxl_single_file), "pt") as f:
        ldm_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    te1 = CLIPTextModel.from_pretrained(str(tiny_sdxl_diffusers / "text_encoder"))
    te2 = CLIPTextModelWithProjection.from_pretrained(str(tiny_sdxl_diffusers / "text_encoder_2"))
    return comfy_key_map_sdxl(ldm_shapes, hf_text_encoder_shapes(te1), hf_text_encoder_shapes(te2))


def _train(model, data, out, **kw):
    from sd_scripts.training.loop import train

    values = dict(max_train_steps=2, train_batch_size=1, bucket_reso_steps=32, network_dim=4, network_alpha=2.0)
    values.update(kw)
    return train(tiny_config(model, data, out, **values))


def _moved(sd, name: str, moving) -> bool:
    parts = (moving,) if isinstance(moving, str) else moving
    return any(float(sd[f"{name}.{p}"].abs().max()) > 0 for p in parts if f"{name}.{p}" in sd)


def _metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


# --------------------------------------------------------------------------- every network type

@pytest.mark.parametrize("case", list(NETWORKS))
def test_network_type_trains_on_sdxl_and_writes_an_sdxl_file(case, tiny_sdxl_diffusers, tiny_sdxl_single_file, dataset,
                                                            comfy_map, tmp_path):
    from sd_scripts.networks.ldm_lora_map import build_lora_map
    from sd_scripts.networks.lycoris_merge import merge_networks_into_checkpoint_file

    module, args, parts, moving = NETWORKS[case]
    settings = dict(network_module=module, network_args=args, learning_rate=1e-2 if case == "ia3" else 1e-3)
    model = tiny_sdxl_diffusers
    if case in ON_SINGLE_FILE:
        from sd_scripts.testing.tiny_models import tiny_tokenizer_cache_dir

        model = tiny_sdxl_single_file
        settings["tokenizer_cache_dir"] = str(tiny_tokenizer_cache_dir(model))
    result = _train(model, dataset, tmp_path / "out", **settings)
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    sd = load_file(result.output_path)
    assert all(torch.isfinite(v.float()).all() for v in sd.values())
    modules = modules_of(sd)

    # kohya's SDXL names: both text encoders, SGM UNet paths
    unet = [n for n in modules if n.startswith("lora_unet_")]
    te1 = [n for n in modules if n.startswith(TE_PREFIXES[0])]
    te2 = [n for n in modules if n.startswith(TE_PREFIXES[1])]
    assert len(unet) + len(te1) + len(te2) == len(modules), sorted(set(modules) - set(unet) - set(te1) - set(te2))[:5]
    assert te1 and te2, "both text encoders carry modules"
    assert all(n.startswith(SGM_UNET) and not DIFFUSERS_WORDS.search(n) for n in unet), sorted(unet)[:5]
    for block in ("input_blocks", "middle_block", "output_blocks"):
        assert any(n.startswith(f"lora_unet_{block}_") for n in unet), block
    for name, have in modules.items():
        assert parts <= have, (name, have)
    trained = {n for n in modules if _moved(sd, n, moving)}
    assert any(n.startswith("lora_unet_") for n in trained) and any(n.startswith(TE_PREFIXES[1]) for n in trained)

    md = _metadata(result.output_path)
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_v2"] == "False"
    assert md["ss_network_module"] == module
    # kohya writes "/lora" for every network its trainer saves, LyCORIS included (as this project does on SD1)
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"

    # the file loads back (network_weights) into the network the same settings build, value for value
    from sd_scripts.models.loading import load_model
    from sd_scripts.networks.factory import build_network

    config = tiny_config(model, dataset, tmp_path / "again", network_weights=result.output_path, **settings)
    again = build_network(config, load_model(config), train_unet=True, train_text_encoder=True).network
    reloaded = again.kohya_state_dict()
    assert reloaded.keys() == sd.keys()
    for key, value in sd.items():
        assert torch.equal(reloaded[key].to(value.dtype).reshape(value.shape), value), key

    # ComfyUI places every module on the SDXL model
    assert sorted(set(modules) - set(comfy_map)) == []
    for name in modules:
        if f"{name}.lora_down.weight" in sd:
            down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
            assert tuple(comfy_map[name]) == (up.shape[0], *down.shape[1:]), name
        elif f"{name}.diff" in sd:
            assert tuple(comfy_map[name]) == tuple(sd[f"{name}.diff"].shape), name

    # merged into the single-file checkpoint: exactly the targeted weights change, every trained module's does
    merged_path = tmp_path / "merged.safetensors"
    report = merge_networks_into_checkpoint_file(tiny_sdxl_single_file, [result.output_path], [1.0], merged_path)
    label = str(result.output_path)
    assert report.merged[label] == len(modules) and report.unmatched[label] == []
    base, merged = load_file(str(tiny_sdxl_single_file)), load_file(str(merged_path))
    assert merged.keys() == base.keys()
    lora_map = build_lora_map({k: tuple(v.shape) for k, v in base.items()})
    targets = {lora_map[n].weight_key for n in modules} | {lora_map[n].bias_key for n in modules}
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and changed <= targets, sorted(changed - targets)[:5]
    assert any(k.endswith(".bias") for k in changed) == any(k.endswith(".diff_b") for k in sd)
    for name in trained:
        target = lora_map[name]
        rows = slice(*target.rows) if target.rows is not None else slice(None)
        assert not torch.equal(base[target.weight_key][rows], merged[target.weight_key][rows]), name


# --------------------------------------------------------------------------- optimizers

# optimizer_type -> (optimizer_args, learning_rate, lr_scheduler, package)
OPTIMIZERS = {
    "AdamW8bit": ([], 1e-3, "constant", "bitsandbytes"),
    "Lion": ([], 1e-4, "constant", "lion_pytorch"),
    "Prodigy": (["d_coef=2.0"], 1.0, "constant", "prodigyopt"),
    "DAdaptAdam": ([], 1.0, "constant", "dadaptation"),
    "AdaFactor": (["scale_parameter=True", "relative_step=True", "warmup_init=True"], 1e-3, "adafactor",
                  "transformers"),
    "SGDNesterov": (["momentum=0.9"], 1e-2, "cosine", "torch"),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_trains_an_sdxl_lora(name, tiny_sdxl_diffusers, dataset, tmp_path):
    args, lr, scheduler, package = OPTIMIZERS[name]
    pytest.importorskip(package)
    result = _train(tiny_sdxl_diffusers, dataset, tmp_path / "out", optimizer_type=name, optimizer_args=args,
                    learning_rate=lr, lr_scheduler=scheduler)
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    sd = load_file(result.output_path)
    assert all(torch.isfinite(v.float()).all() for v in sd.values())
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        ups = [v for k, v in sd.items() if k.startswith(prefix) and k.endswith("lora_up.weight")]
        assert ups and any(float(v.abs().max()) > 0 for v in ups), (name, prefix)
    md = _metadata(result.output_path)
    assert md["ss_optimizer"].split("(")[0].lower().endswith(name.lower().replace("sgdnesterov", "sgd"))
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"


def test_adafactor_own_schedule_with_dylora(tiny_sdxl_diffusers, dataset, tmp_path):
    """AdaFactor's relative-step schedule with DyLoRA, whose untrained rank slices get no gradient in a step."""
    pytest.importorskip("transformers")
    result = _train(tiny_sdxl_diffusers, dataset, tmp_path / "out", optimizer_type="AdaFactor",
                    lr_scheduler="adafactor", network_module="networks.dylora", network_args=["unit=2"],
                    text_encoder_lr=1e-4, unet_lr=1e-3)
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)


# --------------------------------------------------------------------------- text encoders at their own lr

@pytest.mark.parametrize("te_lr, group_lrs", [(5e-4, [5e-4, 5e-4]), ([5e-4, 2e-4], [5e-4, 2e-4])])
def test_text_encoders_train_at_text_encoder_lr(te_lr, group_lrs, tiny_sdxl_single_file, dataset, tmp_path,
                                                monkeypatch):
    """Both SDXL text encoders train, each in its own parameter group at text_encoder_lr (one value for both, or one
    per text encoder as kohya's list); the UNet at unet_lr."""
    from sd_scripts.training import optimizers
    from sd_scripts.testing.tiny_models import tiny_tokenizer_cache_dir
    from sd_scripts.networks import factory

    built: dict[str, object] = {}
    build_network, build_optimizer = factory.build_network, optimizers.build_optimizer

    def recording_network(*a, **kw):
        built["network"] = build_network(*a, **kw)
        return built["network"]

    def recording_optimizer(*a, **kw):
        built["optimizer"] = build_optimizer(*a, **kw)
        return built["optimizer"]

    monkeypatch.setattr(factory, "build_network", recording_network)
    monkeypatch.setattr(optimizers, "build_optimizer", recording_optimizer)
    result = _train(tiny_sdxl_single_file, dataset, tmp_path / "out", text_encoder_lr=te_lr, unet_lr=2e-3,
                    learning_rate=1e-3, tokenizer_cache_dir=str(tiny_tokenizer_cache_dir(tiny_sdxl_single_file)))
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    network, optimizer = built["network"].network, built["optimizer"].optimizer
    assert [g["lr"] for g in optimizer.param_groups] == [*group_lrs, 2e-3]
    # group i holds exactly the parameters of text encoder 1, text encoder 2, the UNet
    for group, prefix in zip(optimizer.param_groups, ("lora_te1_", "lora_te2_", "lora_unet_")):
        want = {id(p) for lora in network.loras if lora.lora_name.startswith(prefix) for p in lora.parameters()}
        assert want and {id(p) for p in group["params"]} == want, prefix
    sd = load_file(result.output_path)
    for prefix in ("lora_te1_", "lora_te2_"):
        assert any(float(v.abs().max()) > 0 for k, v in sd.items() if k.startswith(prefix) and "lora_up" in k), prefix
    md = _metadata(result.output_path)
    assert md["ss_text_encoder_lr"] == str(te_lr) and md["ss_unet_lr"] == "0.002"


def test_text_encoder_lr_values_are_checked_and_parsed():
    from sd_scripts.core.config import TrainConfig
    from sd_scripts.models.families import check_family_settings, get_family
    from sd_scripts.training.preflight import check_settings
    from sd_scripts.train_network import config_from_args

    def te_lr_errors(config, family):
        found = [str(e) for e in check_settings(config) + check_family_settings(config, get_family(family))[0]]
        return [text for text in found if text.startswith("text_encoder_lr")]

    assert te_lr_errors(TrainConfig(text_encoder_lr=[1e-4, 5e-5]), "sdxl") == []
    assert te_lr_errors(TrainConfig(text_encoder_lr=[1e-4]), "sd1") == []
    assert te_lr_errors(TrainConfig(text_encoder_lr=[1e-4, 5e-5]), "sd1") == [
        "text_encoder_lr: 2 values, but SD1 has 1 text encoder; give at most 1"]
    assert te_lr_errors(TrainConfig(text_encoder_lr=[1e-4, 5e-5, 1e-5]), "sdxl") == [
        "text_encoder_lr: 3 values, but SDXL has 2 text encoders; give at most 2"]
    bad = te_lr_errors(TrainConfig(text_encoder_lr=[1e-4, -1.0]), "sdxl")
    assert len(bad) == 1 and "one per text encoder" in bad[0] and "\n" not in bad[0]
    # kohya's command line: one value is a number, several a list
    assert config_from_args(["--text_encoder_lr", "1e-4"]).text_encoder_lr == 1e-4
    assert config_from_args(["--text_encoder_lr", "1e-4", "5e-5"]).text_encoder_lr == [1e-4, 5e-5]


# --------------------------------------------------------------------------- precision

def test_bf16_after_a_float32_run_in_the_same_process(tiny_sdxl_diffusers, dataset, tmp_path):
    """accelerate keeps one mixed precision per process: train() must still take another one on a later call."""
    first = _train(tiny_sdxl_diffusers, dataset, tmp_path / "a", max_train_steps=1, mixed_precision="no")
    result = _train(tiny_sdxl_diffusers, dataset, tmp_path / "b", mixed_precision="bf16", save_precision="fp16",
                    network_module="lycoris.kohya", network_args=["algo=loha", "conv_dim=2"])
    assert first.losses and len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    sd = load_file(result.output_path)
    assert {v.dtype for v in sd.values()} == {torch.float16}
    assert _metadata(result.output_path)["ss_mixed_precision"] == "bf16"
