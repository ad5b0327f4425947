"""kohya's scale_weight_norms, base_weights(_multiplier) and initial_epoch/initial_step/skip_until_initial_step."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from tests.helpers import make_dataset, tiny_config

def _train(config, callbacks=None):
    from sd_scripts.training.loop import train

    return train(config, callbacks)


class _Recorder:
    """on_progress as (step, lr, epoch) rows; on_step_info as (step, info)."""

    def __init__(self):
        self.rows: list[tuple[int, float, int]] = []
        self.infos: list[tuple[int, dict]] = []

    def on_progress(self, step, total, loss, lr, epoch):
        self.rows.append((step, lr, epoch))

    def on_step_info(self, step, info):
        self.infos.append((step, dict(info)))


def _kohya_delta(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """kohya's apply_max_norm_regularization delta, written out: linear ``up @ down``, k x k conv by conv2d."""
    scale = alpha / down.shape[0]
    if down.dim() == 4 and down.shape[2:] != (1, 1):
        return torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale
    if down.dim() == 4:
        return (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scale
    return up @ down * scale


# ------------------------------------------------------------------------------------------- max norm


@pytest.mark.parametrize("kind", ["lora", "dylora"])
def test_max_norm_scales_only_the_modules_above_the_limit_as_kohya(kind):
    from sd_scripts.networks.dylora import DyLoRAModule, DyLoRANetwork
    from sd_scripts.networks.lora import LoRAModule, LoRANetwork

    torch.manual_seed(0)
    module_cls, network_cls = (LoRAModule, LoRANetwork) if kind == "lora" else (DyLoRAModule, DyLoRANetwork)
    layers = {"lora_unet_lin": nn.Linear(12, 10), "lora_unet_conv3": nn.Conv2d(6, 8, 3, padding=1),
              "lora_unet_conv1": nn.Conv2d(6, 4, 1), "lora_te_small": nn.Linear(5, 3)}
    loras = [module_cls(name, layer, lora_dim=4, alpha=2.0) for name, layer in layers.items()]
    with torch.no_grad():
        for lora, gain in zip(loras, (3.0, 2.0, 1.5, 0.001)):
            for p in lora.parameters():
                p.copy_(torch.randn_like(p) * gain)
    network = network_cls(loras[:3], loras[3:])
    before = {k: v.clone() for k, v in network.kohya_state_dict().items()}
    norms = {lora.lora_name: float(_kohya_delta(before[f"{lora.lora_name}.lora_down.weight"],
                                                before[f"{lora.lora_name}.lora_up.weight"], 2.0).norm())
             for lora in loras}
    limit = sorted(norms.values())[2] * 0.999  # the two biggest deltas are above it
    keys_scaled, mean, largest = network.apply_max_norm_regularization(limit)

    # kohya's arithmetic: norm' = max(norm, limit/2), ratio = min(norm', limit)/norm', factors x sqrt(ratio)
    expected = []
    for name, norm in norms.items():
        clamped = max(norm, limit / 2)
        ratio = min(clamped, limit) / clamped
        expected.append(norm * ratio)
        after = network.kohya_state_dict()
        for part in ("lora_down.weight", "lora_up.weight"):
            key = f"{name}.{part}"
            if ratio == 1:
                assert torch.equal(after[key], before[key]), key  # untouched, bit for bit
            else:
                torch.testing.assert_close(after[key], before[key] * math.sqrt(ratio), rtol=1e-6, atol=1e-7)
        new_norm = float(_kohya_delta(after[f"{name}.lora_down.weight"], after[f"{name}.lora_up.weight"], 2.0).norm())
        assert new_norm <= limit * (1 + 1e-5)
    assert keys_scaled == 2
    assert mean == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert largest == pytest.approx(max(expected), rel=1e-5) and largest == pytest.approx(limit, rel=1e-5)


@pytest.fixture()
def dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "data", count=4)


def _module_norms(path: str) -> dict[str, float]:
    sd = load_file(path)
    names = {k.partition(".")[0] for k in sd if k.endswith("lora_down.weight")}
    return {n: float(_kohya_delta(sd[f"{n}.lora_down.weight"].float(), sd[f"{n}.lora_up.weight"].float(),
                                  float(sd[f"{n}.alpha"])).norm()) for n in names}


def _scalars(logdir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for root, _, files in os.walk(logdir):
        if any(f.startswith("events.out.tfevents") for f in files):
            acc = EventAccumulator(root)
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                out[tag] = [e.value for e in acc.Scalars(tag)]
    return out


@pytest.mark.slow
def test_scale_weight_norms_training_keeps_every_module_within_the_limit(tiny_sd1_diffusers, dataset, tmp_path):
    limit = 2e-4
    logs = tmp_path / "logs"
    recorder = _Recorder()
    config = tiny_config(tiny_sd1_diffusers, dataset, tmp_path / "out", scale_weight_norms=limit, logging_dir=str(logs),
                         network_args=["conv_dim=2", "conv_alpha=1"], max_train_steps=3)
    result = _train(config, recorder)
    norms = _module_norms(result.output_path)
    assert any("conv1" in n for n in norms)  # LoCon convs are held too
    assert max(norms.values()) <= limit * (1 + 1e-4)
    assert max(norms.values()) > limit * 0.99  # the limit was reached, so scaling happened
    with safe_open(result.output_path, "pt") as f:
        assert f.metadata()["ss_scale_weight_norms"] == str(limit)
    scalars = _scalars(logs)
    assert len(scalars["max_norm/keys_scaled"]) == 3 and scalars["max_norm/keys_scaled"][-1] > 0
    assert scalars["max_norm/max_key_norm"][-1] == pytest.approx(limit, rel=1e-4)
    assert 0 < scalars["max_norm/average_key_norm"][-1] <= limit * (1 + 1e-4)
    assert [step for step, _ in recorder.infos] == [1, 2, 3] and recorder.infos[-1][1]["keys_scaled"] > 0


@pytest.mark.slow
def test_scale_weight_norms_with_lycoris_uses_its_own_max_norm(tiny_sd1_diffusers, dataset, tmp_path):
    limit = 2e-4
    config = tiny_config(tiny_sd1_diffusers, dataset, tmp_path / "out", network_module="lycoris.kohya",
                         network_args=["algo=lora"], scale_weight_norms=limit, max_train_steps=2)
    result = _train(config)
    norms = _module_norms(result.output_path)
    assert max(norms.values()) <= limit * (1 + 1e-3) and max(norms.values()) > limit * 0.99


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_lycoris_max_norm_reaches_the_saved_file_and_the_training_state(tiny_sd1_diffusers, algo):
    from sd_scripts.core.config import TrainConfig
    from sd_scripts.models.loading import load_model
    from sd_scripts.networks.lycoris_adapter import create_lycoris_network, parse_lycoris_args
    from sd_scripts.networks.network_state import parse_network

    model = load_model(TrainConfig(pretrained_model_name_or_path=str(tiny_sd1_diffusers)))
    args = parse_lycoris_args({"algo": algo, "factor": "4"}, network_dim=2, network_alpha=1.0)
    network, _ = create_lycoris_network(model.unet, model.text_encoders, args, network_dim=2, network_alpha=1.0)
    network.apply_to()
    assert network.supports_max_norm()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def norms():
        return sorted(float(m.delta().norm()) for m in parse_network(network.kohya_state_dict()).values())

    before = norms()
    limit = before[len(before) // 2]
    keys_scaled, _, largest = network.apply_max_norm_regularization(limit)
    after = norms()
    assert keys_scaled > 0 and max(after) <= limit * (1 + 1e-4) and largest == pytest.approx(limit, rel=1e-4)
    # LoCon/LoHa scale a buffer a training state would not keep: it is folded into the factors
    assert all(float(b) == 1.0 for name, b in network.named_buffers() if name.endswith("scalar"))
    state = {k: v.clone() for k, v in network.state_dict().items()}
    network.load_state_dict(state)
    assert norms() == pytest.approx(after, rel=1e-6)


def test_scale_weight_norms_is_refused_for_lycoris_algos_without_max_norm(tiny_sd1_diffusers, tmp_path):
    from sd_scripts.core.config import TrainConfig
    from sd_scripts.models.loading import load_model
    from sd_scripts.training.preflight import check_settings
    from sd_scripts.networks.lycoris_adapter import create_lycoris_network, parse_lycoris_args

    model = load_model(TrainConfig(pretrained_model_name_or_path=str(tiny_sd1_diffusers)))
    network, _ = create_lycoris_network(model.unet, model.text_encoders, parse_lycoris_args({"algo": "full"}),
                                        network_dim=2, network_alpha=1.0)
    network.apply_to()
    assert not network.supports_max_norm()  # the loop refuses it in one line, whatever preset chose the algo

    config = TrainConfig(output_dir=str(tmp_path), network_module="lycoris.kohya", network_args=["algo=full"],
                         scale_weight_norms=1.0)
    messages = [str(e) for e in check_settings(config)]
    assert any(m.startswith("scale_weight_norms:") and "algo=full" in m for m in messages), messages
    assert not [m for m in map(str, check_settings(config.replace(network_args=["algo=loha"])))
                if m.startswith("scale_weight_norms")]


def test_kohya_ss_gui_scale_weight_norms_zero_is_unset(tmp_path):
    import json

    from frontend.json_io import load_settings_file
    from tests.test_json_io import KOHYA_APRIL_2023

    for given, expected in ((0, None), ("1.5", 1.5)):
        path = tmp_path / "gui.json"
        path.write_text(json.dumps({**KOHYA_APRIL_2023, "scale_weight_norms": given}), encoding="utf-8")
        assert load_settings_file(path).values.get("scale_weight_norms") == expected


# ------------------------------------------------------------------------------------------- base weights


def _base_lora(model_path: Path, path: Path, seed: int = 3) -> Path:
    """A LoCon for the tiny model with random factors (UNet and text encoder)."""
    from sd_scripts.core.config import TrainConfig
    from sd_scripts.files.lora_file import save_lora_file
    from sd_scripts.models.loading import load_model
    from sd_scripts.networks.lora import create_network

    model = load_model(TrainConfig(pretrained_model_name_or_path=str(model_path)))
    network = create_network(model.unet, model.text_encoders, network_dim=2, network_alpha=1.0, conv_dim=2,
                             conv_alpha=1.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_lora_file(path, network.kohya_state_dict(), {"ss_base_model_version": "sd_v1"})
    return path


def _merge_by_hand(model_dir: Path, lora_path: Path, out_dir: Path, multiplier: float) -> Path:
    """A copy of the diffusers folder with ``W += m * up @ down * alpha/dim`` written into its UNet and text encoder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    shutil.copytree(model_dir, out_dir)
    sd = load_file(str(lora_path))
    unet = UNet2DConditionModel.from_pretrained(str(out_dir / "unet"))
    te = CLIPTextModel.from_pretrained(str(out_dir / "text_encoder"))
    layers = {"lora_unet_" + n.replace(".", "_"): m for n, m in unet.named_modules() if n}
    layers.update({"lora_te_" + ("" if n.startswith("text_model.") else "text_model_") + n.replace(".", "_"): m
                   for n, m in te.named_modules() if n})
    names = {k.partition(".")[0] for k in sd if k.endswith(".alpha")}
    with torch.no_grad():
        for name in names:
            weight = layers[name].weight
            down, up, alpha = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], float(sd[f"{name}.alpha"])
            delta = _kohya_delta(down, up, alpha)
            weight += multiplier * delta.reshape(weight.shape)
    unet.save_pretrained(str(out_dir / "unet"))
    te.save_pretrained(str(out_dir / "text_encoder"))
    return out_dir


@pytest.mark.slow
def test_base_weights_equal_training_on_a_checkpoint_merged_by_hand(tiny_sd1_diffusers, dataset, tmp_path):
    lora = _base_lora(tiny_sd1_diffusers, tmp_path / "style.safetensors")
    merged = _merge_by_hand(tiny_sd1_diffusers, lora, tmp_path / "merged", 0.7)
    messages = []

    class Messages:
        def on_message(self, text):
            messages.append(text)

    a = _train(tiny_config(tiny_sd1_diffusers, dataset, tmp_path / "a", base_weights=[str(lora)],
                           base_weights_multiplier=[0.7], max_train_steps=2), Messages())
    b = _train(tiny_config(merged, dataset, tmp_path / "b", max_train_steps=2))
    assert any("base_weights: merged style.safetensors x 0.7" in m for m in messages), messages
    sa, sb = load_file(a.output_path), load_file(b.output_path)
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=1e-6, msg=key)
    assert a.losses == pytest.approx(b.losses, rel=1e-5)


@pytest.mark.slow
def test_base_weights_multiplier_zero_equals_no_base_weights(tiny_sd1_diffusers, dataset, tmp_path):
    lora = _base_lora(tiny_sd1_diffusers, tmp_path / "style.safetensors")
    plain = _train(tiny_config(tiny_sd1_diffusers, dataset, tmp_path / "plain", max_train_steps=2))
    zero = _train(tiny_config(tiny_sd1_diffusers, dataset, tmp_path / "zero", base_weights=[str(lora)],
                              base_weights_multiplier=[0.0], max_train_steps=2))
    full = _train(tiny_config(tiny_sd1_diffusers, dataset, tmp_path / "full", base_weights=[str(lora)],
                              max_train_steps=2))  # multiplier 1.0 by default
    sp, sz, sf = load_file(plain.output_path), load_file(zero.output_path), load_file(full.output_path)
    assert all(torch.equal(sp[k], sz[k]) for k in sp)
    assert any(not torch.equal(sp[k], sf[k]) for k in sp), "a merged LoRA must change what is trained"


def _randomize(network, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _weights(model) -> dict[str, torch.Tensor]:
    parts = {"unet": model.unet, **{f"te{i}": te for i, te in enumerate(model.text_encoders)}}
    return {f"{part}.{k}": v.detach().clone() for part, m in parts.items() for k, v in m.state_dict().items()}


def test_base_weights_merge_sdxl_files_in_either_unet_spelling(tiny_sdxl_diffusers):
    from sd_scripts.core.config import TrainConfig
    from sd_scripts.models.loading import load_model
    from sd_scripts.networks.base_weights import merge_state_dict_into_model
    from sd_scripts.networks.lora import create_network

    config = TrainConfig(pretrained_model_name_or_path=str(tiny_sdxl_diffusers))
    expected_model = load_model(config)
    family = expected_model.family
    common = dict(network_dim=2, network_alpha=1.0, conv_dim=2, conv_alpha=1.0, te_prefixes=family.te_lora_prefixes)
    network = create_network(expected_model.unet, expected_model.text_encoders,
                             unet_path_map=family.lora_unet_path_map(expected_model.unet), **common)
    _randomize(network, 5)
    sgm_file = network.kohya_state_dict()
    assert any(k.startswith("lora_unet_input_blocks_") for k in sgm_file)
    assert any(k.startswith("lora_te2_") for k in sgm_file) and any(k.startswith("lora_te1_") for k in sgm_file)
    network.merge_to(0.5)  # the network's own merge is the reference
    expected = _weights(expected_model)

    model = load_model(config)
    merged, unmatched = merge_state_dict_into_model(model, sgm_file, 0.5)
    assert merged == len(network.loras) and not unmatched
    got = _weights(model)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)

    # the same LoRA written with diffusers UNet names (other trainers) merges the same way
    other = load_model(config)
    diffusers_named = create_network(other.unet, other.text_encoders, **common)
    _randomize(diffusers_named, 5)
    file = diffusers_named.kohya_state_dict()
    assert any(k.startswith("lora_unet_down_blocks_") for k in file)
    merge_state_dict_into_model(other, file, 0.5)
    got = _weights(other)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_base_weights_merge_a_lycoris_file_like_the_applied_network(tiny_sd1_diffusers, algo):
    from sd_scripts.core.config import TrainConfig
    from sd_scripts.models.loading import load_model
    from sd_scripts.networks.base_weights import merge_state_dict_into_model
    from sd_scripts.networks.lycoris_adapter import create_lycoris_network, parse_lycoris_args

    config = TrainConfig(pretrained_model_name_or_path=str(tiny_sd1_diffusers))
    model = load_model(config)
    args = parse_lycoris_args({"algo": algo, "conv_dim": "2", "conv_alpha": "1", "factor": "4"}, network_dim=2,
                              network_alpha=1.0)
    network, _ = create_lycoris_network(model.unet, model.text_encoders, args, network_dim=2, network_alpha=1.0)
    network.apply_to()
    _randomize(network, 9, scale=0.2)
    network.eval()
    file = network.kohya_state_dict()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    ids = torch.randint(0, model.text_encoders[0].config.vocab_size, (1, 8), generator=g)

    def outputs(m):
        with torch.no_grad():
            states = m.text_encoders[0](ids)[0]
            return states, m.unet(latents, torch.tensor([500]), encoder_hidden_states=states).sample

    want_states, want = outputs(model)
    fresh = load_model(config)
    merge_state_dict_into_model(fresh, file, 1.0)
    got_states, got = outputs(fresh)
    torch.testing.assert_close(got_states, want_states, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(outputs(load_model(config))[1], want, atol=1e-4), "the LyCORIS network changes the output"


def test_base_weights_file_family_and_settings_reach_the_engine(tmp_path):
    from sd_scripts.networks.base_weights import lora_file_family

    assert lora_file_family(["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"], {}) == "sdxl"
    assert lora_file_family(["lora_unet_input_blocks_4_1_proj_in.alpha"], {}) == "sdxl"
    assert lora_file_family(["lora_te_text_model_encoder_layers_22_mlp_fc1.alpha"], {}) == "sd2"
    assert lora_file_family(["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"], {}) is None
    assert lora_file_family([], {"ss_base_model_version": "sd_v1"}) == "sd1"

    from frontend.cli import parse_command_line
    from frontend.resolve import resolve_settings
    from frontend.settings_map import to_train_config
    from sd_scripts.train_network import config_from_args

    values, _ = parse_command_line(["--base_weights", "a.safetensors", "b.safetensors",
                                    "--base_weights_multiplier", "0.5", "1"])
    config = to_train_config(resolve_settings(values).store, has_cuda=True, has_xformers=True).config
    assert config.base_weights == ["a.safetensors", "b.safetensors"] and config.base_weights_multiplier == [0.5, 1.0]
    job = tmp_path / "job.json"
    job.write_text('{"base_weights": ["a.safetensors"], "base_weights_multiplier": [0.25]}', encoding="utf-8")
    config = to_train_config(resolve_settings({"load_json_path": str(job)}).store, has_cuda=True,
                             has_xformers=True).config
    assert config.base_weights == ["a.safetensors"] and config.base_weights_multiplier == [0.25]
    config = config_from_args(["--base_weights", "a.safetensors", "--base_weights_multiplier", "0.5"])
    assert config.base_weights == ["a.safetensors"] and config.base_weights_multiplier == [0.5]


# ------------------------------------------------------------------------------------------- initial step


@pytest.fixture()
def small_dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "small", folder="1_sks shape", count=4)  # batch 2: 2 steps per epoch


def _fetches(monkeypatch) -> list[tuple[int, int]]:
    """Record every batch the data loader reads as (epoch, index)."""
    from sd_scripts.data.dataset import TrainDataset

    seen: list[tuple[int, int]] = []
    epoch = [0]
    set_epoch, getitem = TrainDataset.set_epoch, TrainDataset.__getitem__

    def record_epoch(self, e):
        epoch[0] = e
        return set_epoch(self, e)

    def record_item(self, i):
        seen.append((epoch[0], i))
        return getitem(self, i)

    monkeypatch.setattr(TrainDataset, "set_epoch", record_epoch)
    monkeypatch.setattr(TrainDataset, "__getitem__", record_item)
    return seen


@pytest.mark.slow
def test_initial_step_starts_the_counters_and_the_lr_schedule_there(tiny_sd1_diffusers, small_dataset, tmp_path,
                                                                     monkeypatch):
    common = dict(max_train_steps=6, lr_scheduler="linear", save_every_n_epochs=1)
    seen = _fetches(monkeypatch)
    full_rec, start_rec, skip_rec = _Recorder(), _Recorder(), _Recorder()
    _train(tiny_config(tiny_sd1_diffusers, small_dataset, tmp_path / "full", **common), full_rec)
    full_seen = list(seen)
    seen.clear()
    result = _train(tiny_config(tiny_sd1_diffusers, small_dataset, tmp_path / "start", initial_step=3, **common),
                    start_rec)
    start_seen = list(seen)
    seen.clear()
    _train(tiny_config(tiny_sd1_diffusers, small_dataset, tmp_path / "skip", initial_step=3,
                       skip_until_initial_step=True, **common), skip_rec)
    skip_seen = list(seen)

    # the schedule is where the full run's was: linear lr after step s = 1e-3 * (1 - s/6)
    assert [s for s, _, _ in start_rec.rows] == [4, 5, 6]
    full_lr = {s: lr for s, lr, _ in full_rec.rows}
    for s, lr, _ in start_rec.rows + skip_rec.rows:
        assert lr == pytest.approx(full_lr[s], rel=1e-9) and lr == pytest.approx(1e-3 * (1 - s / 6), rel=1e-6)
    # without skip_until_initial_step epoch 2 starts at its first batch (kohya advances only the epoch number)
    assert [e for _, _, e in start_rec.rows] == [2, 2, 3]
    assert start_seen[:3] == [(2, 0), (2, 1), (3, 0)]  # (accelerate's loader reads one batch ahead)
    # with it, the batch step 3 trained on is skipped, and the run sees what the full run saw from step 4 on
    assert [e for _, _, e in skip_rec.rows] == [2, 3, 3] == [e for s, _, e in full_rec.rows if s > 3]
    assert skip_seen == [(2, 1), (3, 0), (3, 1)] == full_seen[3:]
    # file names and metadata follow the counters
    files = sorted(p.name for p in (tmp_path / "start").glob("*.safetensors"))
    assert files == ["tiny-000002.safetensors", "tiny.safetensors"]
    assert result.global_step == 6 and result.epochs == 3
    with safe_open(result.output_path, "pt") as f:
        assert (f.metadata()["ss_steps"], f.metadata()["ss_epoch"]) == ("6", "3")
    assert len(result.losses) == 3


@pytest.mark.slow
def test_initial_epoch_and_skipping_with_gradient_accumulation(tiny_sd1_diffusers, small_dataset, tmp_path,
                                                               monkeypatch):
    seen = _fetches(monkeypatch)
    rec = _Recorder()
    # batch 1, 2 batches per step: 4 batches, 2 steps per epoch; epoch 2 starts at step 2
    result = _train(tiny_config(tiny_sd1_diffusers, small_dataset, tmp_path / "epoch", train_batch_size=1,
                                gradient_accumulation_steps=2, max_train_steps=4, initial_epoch=2), rec)
    assert [(s, e) for s, _, e in rec.rows] == [(3, 2), (4, 2)] and result.global_step == 4
    assert seen == [(2, 0), (2, 1), (2, 2), (2, 3)]
    seen.clear()
    rec = _Recorder()
    _train(tiny_config(tiny_sd1_diffusers, small_dataset, tmp_path / "skip", train_batch_size=1,
                       gradient_accumulation_steps=2, max_train_steps=4, initial_step=3,
                       skip_until_initial_step=True), rec)
    assert [(s, e) for s, _, e in rec.rows] == [(4, 2)]
    assert seen == [(2, 2), (2, 3)]  # the 2 batches of step 3 were skipped, not read


@pytest.mark.slow
def test_a_run_started_at_initial_step_resumes_exactly(tiny_sd1_diffusers, small_dataset, tmp_path):
    common = dict(max_train_steps=6, lr_scheduler="cosine", initial_step=1, skip_until_initial_step=True)
    whole = _train(tiny_config(tiny_sd1_diffusers, small_dataset, tmp_path / "whole", save_state=True,
                               save_every_n_steps=4, **common))
    state = tmp_path / "whole" / "tiny-step00000004-state"
    assert state.is_dir()
    resumed = _train(tiny_config(tiny_sd1_diffusers, small_dataset, tmp_path / "resumed", resume=str(state),
                                 max_train_steps=6, lr_scheduler="cosine"))
    assert resumed.global_step == 6 and resumed.losses == whole.losses
    a, b = load_file(whole.output_path), load_file(resumed.output_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_initial_step_settings_are_checked(tmp_path):
    from sd_scripts.core.config import TrainConfig
    from sd_scripts.training.preflight import check_settings

    def problems(**values):
        config = TrainConfig(output_dir=str(tmp_path), **values)
        return [str(e) for e in check_settings(config)]

    assert any(m.startswith("initial_step:") for m in problems(initial_step=-1))
    assert any(m.startswith("initial_step:") and "max_train_steps" in m
               for m in problems(initial_step=10, max_train_steps=10))
    assert any(m.startswith("initial_epoch:") for m in problems(initial_epoch=0))
    assert any(m.startswith("initial_epoch:") and "last epoch" in m
               for m in problems(initial_epoch=4, max_train_epochs=3))
    assert any(m.startswith("initial_step:") and "resume" in m for m in problems(initial_step=2, resume=str(tmp_path)))
    assert not [m for m in problems(initial_step=0, initial_epoch=1, skip_until_initial_step=True)
                if m.startswith("initial")]
