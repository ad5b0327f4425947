"""LoRA files: formats and precisions, kohya hashes, atomic writes, metadata, and loading the
files the way their consumers do (diffusers load_lora_weights, ComfyUI key rules; A1111's: test_a1111_rules.py)."""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import struct

import pytest
import torch

from sd_scripts.files.atomic import atomic_save_bytes, atomic_save_text, atomic_write
from sd_scripts.core.errors import ConfigError
from sd_scripts.files.lora_file import (
    build_modelspec,
    file_sha256,
    legacy_model_hash,
    load_lora_file,
    precision_dtype,
    read_safetensors_metadata,
    safetensors_hashes,
    save_lora_file,
)
from sd_scripts.networks.lora import create_network
from tests.helpers import saved_random_lora


def _small_sd(big: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = "lora_unet_down_blocks_0_attentions_0_proj_in"
    t = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    width = 8  # big: > 1.1 MiB of fp16 tensor data, so the legacy hash window has data
    return {
        n + ".lora_down.weight": torch.randn(4, width, 1, 1, generator=g),
        n + ".lora_up.weight": torch.randn(width, 4, 1, 1, generator=g),
        n + ".alpha": torch.tensor(2.0),
        t + ".lora_down.weight": torch.randn(4, 160_000 if big else 8, generator=g),
        t + ".lora_up.weight": torch.randn(8, 4, generator=g),
        t + ".alpha": torch.tensor(4.0),
    }


# --------------------------------------------------------------------------- formats and precision

@pytest.mark.parametrize("fmt", ["safetensors", "ckpt", "pt"])
@pytest.mark.parametrize("precision", [None, "float", "fp16", "bf16"])
def test_round_trip_every_format_and_precision(tmp_path, fmt, precision):
    sd = _small_sd()
    path = tmp_path / f"x.{fmt}"
    written = save_lora_file(path, sd, {"ss_network_dim": "4", "modelspec.title": "x"}, precision_dtype(precision), fmt)
    loaded, md = load_lora_file(path)
    dtype = precision_dtype(precision) or torch.float32
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert loaded[k].dtype == dtype, k
        assert torch.equal(loaded[k], v.to(dtype)), k
    assert loaded["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"].dim() == 0
    if fmt == "safetensors":
        assert md == written
        assert md["ss_network_dim"] == "4" and md["modelspec.title"] == "x"
        assert re.fullmatch(r"[0-9a-f]{64}", md["sshs_model_hash"])
        assert re.fullmatch(r"[0-9a-f]{8}", md["sshs_legacy_hash"])
    else:
        assert written is None and md == {}
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temp files left


def test_save_accepts_precision_names_and_noncontiguous_tensors(tmp_path):
    base = torch.randn(8, 4)
    sd = {"lora_unet_x.lora_down.weight": base.T, "lora_unet_x.lora_up.weight": base[:, :2],
          "lora_unet_x.alpha": torch.tensor(4, dtype=torch.int64)}
    save_lora_file(tmp_path / "a.safetensors", sd, None, "fp16")
    loaded, md = load_lora_file(tmp_path / "a.safetensors")
    assert loaded["lora_unet_x.lora_down.weight"].shape == (4, 8)
    assert loaded["lora_unet_x.alpha"].dtype == torch.float16 and loaded["lora_unet_x.alpha"].item() == 4
    assert set(md) == {"sshs_model_hash", "sshs_legacy_hash"}
    with pytest.raises(ConfigError, match="save_model_as"):
        save_lora_file(tmp_path / "b.bin", sd, None, None, "bin")


def test_precision_dtype():
    assert precision_dtype(None) is None and precision_dtype("no") is None and precision_dtype("") is None
    assert precision_dtype("float") is torch.float32 and precision_dtype("fp32") is torch.float32
    assert precision_dtype("FP16") is torch.float16 and precision_dtype("bf16") is torch.bfloat16
    assert precision_dtype(torch.float16) is torch.float16
    with pytest.raises(ConfigError, match="save_precision"):
        precision_dtype("fp8")
    with pytest.raises(ConfigError, match="mixed_precision"):
        precision_dtype("int4", setting="mixed_precision")


def test_metadata_values_are_strings(tmp_path):
    meta = {"ss_network_dim": 4, "ss_v2": False, "ss_network_args": None, "ss_resolution": (512, 512),
            "ss_learning_rate": 0.0001, "ss_output_name": "naïve ☃", "ss_tag_frequency": '{"a": {"b": 1}}'}
    save_lora_file(tmp_path / "m.safetensors", _small_sd(), meta, None)
    md = read_safetensors_metadata(tmp_path / "m.safetensors")
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_network_dim"] == "4" and md["ss_v2"] == "False" and md["ss_network_args"] == "None"
    assert md["ss_resolution"] == "(512, 512)" and md["ss_learning_rate"] == "0.0001"
    assert md["ss_output_name"] == "naïve ☃" and md["ss_tag_frequency"] == '{"a": {"b": 1}}'


# --------------------------------------------------------------------------- hashes

def _independent_addnet_hashes(sd, metadata, tmp_path):
    """kohya's precalculate_safetensors_hashes, through a real file: ss_ metadata only."""
    from safetensors.torch import save_file

    tmp = tmp_path / "hash_only.safetensors"
    save_file(sd, str(tmp), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    data = tmp.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


@pytest.mark.parametrize("precision", [None, "fp16"])
def test_sshs_hashes_match_an_independent_computation(tmp_path, precision):
    sd = _small_sd(big=True)
    meta = {"ss_network_dim": "4", "ss_output_name": "x", "modelspec.title": "changes nothing",
            "modelspec.architecture": "stable-diffusion-v1/lora"}
    written = save_lora_file(tmp_path / "h.safetensors", sd, meta, precision_dtype(precision))
    cast = {k: v.to(precision_dtype(precision) or v.dtype).contiguous() for k, v in sd.items()}
    model_hash, legacy = _independent_addnet_hashes(cast, meta, tmp_path)
    assert written["sshs_model_hash"] == model_hash
    assert written["sshs_legacy_hash"] == legacy
    assert legacy != hashlib.sha256(b"").hexdigest()[:8]  # the 0x100000 window really holds data
    # the model hash is the hash of the final file's tensor data too
    data = (tmp_path / "h.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert hashlib.sha256(data[8 + n:]).hexdigest() == model_hash
    # non-ss metadata does not change the hashes
    assert safetensors_hashes(cast, {"ss_network_dim": "4", "ss_output_name": "x"}) == (model_hash, legacy)


def test_legacy_model_hash_and_file_sha256(tmp_path):
    data = os.urandom(0x120000)
    path = tmp_path / "model.ckpt"
    path.write_bytes(data)
    assert legacy_model_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- atomic writes

def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "lora.safetensors"
    atomic_save_bytes(path, b"old contents")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write(b"partial")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["lora.safetensors"]


def test_failed_lora_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "lora.ckpt"
    save_lora_file(path, _small_sd(), None, None, "ckpt")
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a pickle")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        save_lora_file(path, _small_sd(), None, "fp16", "ckpt")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["lora.ckpt"]
    # a non-tensor value is refused before anything is written
    with pytest.raises(TypeError):
        save_lora_file(path, {"lora_unet_x.alpha": 1.0}, None, None, "ckpt")
    assert path.read_bytes() == before


def test_atomic_write_text_mode_permissions_and_parents(tmp_path):
    path = tmp_path / "sub" / "dir" / "a.txt"
    atomic_save_text(path, "héllo\n")
    assert path.read_text(encoding="utf-8") == "héllo\n"
    if os.name == "posix":
        os.chmod(path, 0o640)
        atomic_save_text(path, "again")
        assert (path.stat().st_mode & 0o777) == 0o640
        umask = os.umask(0)
        os.umask(umask)
        new = tmp_path / "fresh.bin"
        atomic_save_bytes(new, b"x")
        assert (new.stat().st_mode & 0o777) == (0o666 & ~umask)


# --------------------------------------------------------------------------- loading errors

def test_load_lora_file_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="network_weights.*does not exist"):
        load_lora_file(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a model file at all")
    with pytest.raises(ConfigError, match="network_weights.*could not be read"):
        load_lora_file(junk)
    from safetensors.torch import save_file

    model = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(model))
    with pytest.raises(ConfigError, match="base_weights.*not a kohya LoRA"):
        load_lora_file(model, setting="base_weights")
    peft = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 2)}, str(peft))
    with pytest.raises(ConfigError, match="not a kohya LoRA"):
        load_lora_file(peft)
    pickle = tmp_path / "obj.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1), "note": "text"}, pickle)
    with pytest.raises(ConfigError, match="network_weights"):
        load_lora_file(pickle)


# --------------------------------------------------------------------------- modelspec

def test_build_modelspec():
    date = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456)
    spec = build_modelspec("stable-diffusion-v1", "my lora", 512, "epsilon", None, date)
    assert spec == {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "my lora",
        "modelspec.resolution": "512x512",
        "modelspec.date": "2024-05-06T07:08:09",
        "modelspec.prediction_type": "epsilon",
    }
    v = build_modelspec("stable-diffusion-v2-768-v", None, (768, 640), "v", 2, 0, timestep_range=(0, 500),
                        extra={"author": "me", "license": None})
    assert v["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert v["modelspec.resolution"] == "768x640" and v["modelspec.prediction_type"] == "v"
    assert v["modelspec.encoder_layer"] == "2" and v["modelspec.timestep_range"] == "0,500"
    assert v["modelspec.title"].startswith("LoRA@") and v["modelspec.author"] == "me"
    assert "modelspec.license" not in v
    assert build_modelspec("stable-diffusion-v1/lycoris", "t", "512,768")["modelspec.resolution"] == "512x768"
    xl = build_modelspec("stable-diffusion-xl-v1-base", "t", 1024)
    assert xl["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert all(isinstance(x, str) for x in v.values())


# --------------------------------------------------------------------------- consumers: diffusers

def _pipe(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe):
    return pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def _hand_merge(pipe, sd):
    """W += up @ down * alpha / rank into the pipeline's weights, found by kohya's naming rule
    (written independently of sd_scripts.files.lora_keys)."""
    index = {"lora_unet_" + n.replace(".", "_"): m for n, m in pipe.unet.named_modules()}
    for n, m in pipe.text_encoder.named_modules():
        path = n if n.startswith("text_model.") else "text_model." + n
        index["lora_te_" + path.replace(".", "_")] = m
    names = {k.split(".")[0] for k in sd}
    with torch.no_grad():
        for name in names:
            down = sd[name + ".lora_down.weight"].float()
            up = sd[name + ".lora_up.weight"].float()
            scale = sd[name + ".alpha"].float().item() / down.shape[0]
            if down.dim() == 2:
                delta = up @ down
            elif down.shape[2:] == (1, 1):
                delta = (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None]
            else:  # kohya's 3x3 formula
                delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
            weight = index[name].weight
            weight += delta * scale
    return len(names)


@pytest.mark.parametrize("family, conv_dim, precision", [("sd1", None, None), ("sd1", 3, "fp16"), ("sd2", 2, None)])
def test_diffusers_load_lora_weights_reproduces_hand_merge(request, tmp_path, family, conv_dim, precision):
    pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer

    folder = request.getfixturevalue(f"tiny_{family}_diffusers")
    pipe = _pipe(folder)
    base = _image(pipe)
    net = create_network(pipe.unet, [pipe.text_encoder], network_dim=4, network_alpha=2.0, conv_dim=conv_dim,
                         conv_alpha=1.5)
    path = tmp_path / "lora.safetensors"
    sd, _ = saved_random_lora(net, path, {"ss_network_module": "networks.lora"}, precision)
    assert any(v.dim() == 4 and v.shape[2:] == (3, 3) for v in sd.values()) == (conv_dim is not None)

    reference = _pipe(folder)
    merged_modules = _hand_merge(reference, sd)
    expected = _image(reference)

    pipe.load_lora_weights(str(path))
    got = _image(pipe)
    injected = sum(isinstance(m, LoraLayer) for m in pipe.unet.modules()) + sum(
        isinstance(m, LoraLayer) for m in pipe.text_encoder.modules())
    assert injected == merged_modules == len(net.loras)
    assert abs(expected - base).max() > 0.05, "the LoRA must visibly change the image"
    assert abs(got - expected).max() < 1e-4


def test_text_encoder_only_file_loads_in_diffusers(tiny_sd1_diffusers, tmp_path):
    pytest.importorskip("peft")
    pipe = _pipe(tiny_sd1_diffusers)
    base = _image(pipe)
    net = create_network(pipe.unet, [pipe.text_encoder], train_unet=False, network_dim=2, network_alpha=1)
    with torch.no_grad():
        for lora in net.loras:
            lora.lora_up.weight.normal_(0, 0.5)
    path = tmp_path / "te.safetensors"
    save_lora_file(path, net.kohya_state_dict(), None, None)
    reference = _pipe(tiny_sd1_diffusers)
    _hand_merge(reference, load_lora_file(path)[0])
    expected = _image(reference)
    pipe.load_lora_weights(str(path))
    got = _image(pipe)
    assert abs(expected - base).max() > 1e-3
    assert abs(got - expected).max() < 1e-4


# --------------------------------------------------------------------------- consumers: ComfyUI key rules

COMFY_LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                       "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                       "self_attn.out_proj": "self_attn_out_proj"}


def comfy_key_map_sd1(unet_weight_names, num_te_layers):
    """ComfyUI's SD1 key map (comfy/lora.py model_lora_keys_unet / model_lora_keys_clip):
    ``lora_unet_<diffusers weight path without .weight, . -> _>`` for every UNet weight, and
    ``lora_te_text_model_encoder_layers_<b>_<part>`` for the six CLIP projections of each layer."""
    key_map = {}
    for k in unet_weight_names:
        if k.endswith(".weight"):
            key_map["lora_unet_" + k[: -len(".weight")].replace(".", "_")] = "unet:" + k
    for b in range(num_te_layers):
        for c, short in COMFY_LORA_CLIP_MAP.items():
            key_map[f"lora_te_text_model_encoder_layers_{b}_{short}"] = f"clip_l:text_model.encoder.layers.{b}.{c}.weight"
    return key_map


def comfy_unloaded_keys(sd, key_map):
    """Keys ComfyUI would report as 'lora key not loaded' (it reads lora_up/lora_down/alpha per mapped module)."""
    consumed = set()
    for name in key_map:
        for suffix in (".lora_up.weight", ".lora_down.weight", ".alpha"):
            if name + suffix in sd:
                consumed.add(name + suffix)
    return sorted(set(sd) - consumed)


def test_comfyui_maps_every_key_of_a_tiny_sd1_locon(tiny_sd1_diffusers):
    pipe = _pipe(tiny_sd1_diffusers)
    net = create_network(pipe.unet, [pipe.text_encoder], network_dim=4, conv_dim=2)
    sd = net.kohya_state_dict()
    unet_sd = pipe.unet.state_dict()
    key_map = comfy_key_map_sd1(unet_sd, pipe.text_encoder.config.num_hidden_layers)
    assert comfy_unloaded_keys(sd, key_map) == []
    te_sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in pipe.text_encoder.state_dict().items()}
    for name in {k.split(".")[0] for k in sd}:
        target = key_map[name]
        weight = unet_sd[target[5:]] if target.startswith("unet:") else te_sd[target[len("clip_l:"):]]
        down, up = sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"]
        delta_shape = (up.shape[0], *down.shape[1:])
        assert tuple(weight.shape) == delta_shape, name


def test_comfyui_maps_every_key_of_a_full_size_sd1_locon():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12))
    sd = create_network(unet, [te], conv_dim=4).kohya_state_dict()
    assert len(sd) == 3 * (278 + 72)
    assert comfy_unloaded_keys(sd, comfy_key_map_sd1(unet.state_dict(), 12)) == []
