"""End-to-end trainings on tiny models: files, keys, metadata, diffusers loading, reproducibility."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers import make_dataset, tiny_config, tree_digest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture()
def dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "data", count=4)


def _train(config):
    from sd_scripts.training.loop import train

    return train(config)


def test_sd1_lora_trains_and_loads_in_diffusers(tiny_sd1_diffusers, dataset, tmp_path):
    out = tmp_path / "out"
    before = tree_digest(dataset)
    result = _train(tiny_config(tiny_sd1_diffusers, dataset, out, save_precision="fp16"))
    assert tree_digest(dataset) == before, "the dataset must not be modified"
    path = Path(result.output_path)
    assert path == out / "tiny.safetensors" and path.is_file()
    assert all(torch.isfinite(torch.tensor(result.losses)))
    sd = load_file(str(path))
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.") for k in sd)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in sd
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in sd)
    assert all(v.dtype == torch.float16 for v in sd.values())
    alphas = [v for k, v in sd.items() if k.endswith(".alpha")]
    assert alphas and all(a.dim() == 0 and float(a) == 2.0 for a in alphas)
    ups = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    assert any(float(u.abs().max()) > 0 for u in ups), "training must move the up weights off zero"
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    assert md["ss_network_module"] == "networks.lora"
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2.0"
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False"
    assert md["ss_output_name"] == "tiny" and md["ss_steps"] == "4"
    assert json.loads(md["ss_tag_frequency"]) == {"5_sks shape": {"sks shape": 4, "red": 1, "green": 1, "blue": 1, "white": 1, "circle": 4}}
    assert json.loads(md["ss_dataset_dirs"]) == {"5_sks shape": {"n_repeats": 5, "img_count": 4}}
    assert len(md["sshs_model_hash"]) == 64 and len(md["sshs_legacy_hash"]) == 8
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1_diffusers), safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def image():
        g = torch.Generator().manual_seed(0)
        return pipe("sks shape, red", num_inference_steps=2, height=64, width=64, generator=g, output_type="np").images[0]

    base = image()
    pipe.load_lora_weights(str(path))
    with_lora = image()
    assert abs(with_lora - base).max() > 1e-4, "the trained LoRA must change the image"


def test_same_seed_same_lora(tiny_sd1_diffusers, dataset, tmp_path):
    a = _train(tiny_config(tiny_sd1_diffusers, dataset, tmp_path / "a"))
    b = _train(tiny_config(tiny_sd1_diffusers, dataset, tmp_path / "b"))
    sa, sb = load_file(a.output_path), load_file(b.output_path)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    c = _train(tiny_config(tiny_sd1_diffusers, dataset, tmp_path / "c", seed=7))
    sc = load_file(c.output_path)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if k.endswith("lora_up.weight"))


def test_sd2_v_prediction_epochs_and_unet_only(tiny_sd2_diffusers, dataset, tmp_path):
    out = tmp_path / "out"
    result = _train(tiny_config(
        tiny_sd2_diffusers, dataset, out, max_train_epochs=2, save_every_n_epochs=1, network_train_unet_only=True,
        min_snr_gamma=5.0, noise_offset=0.05, cache_latents=True, flip_aug=True, train_batch_size=4,
        gradient_accumulation_steps=2, clip_skip=2, max_token_length=150,
    ))
    # 4 images x 5 repeats / batch 4 = 5 batches per epoch; ceil(5 / 2) = 3 steps per epoch
    assert result.global_step == 6
    assert (out / "tiny-000001.safetensors").is_file() and (out / "tiny.safetensors").is_file()
    sd = load_file(result.output_path)
    assert not any(k.startswith("lora_te") for k in sd)
    with safe_open(result.output_path, "pt") as f:
        md = f.metadata()
    assert md["ss_base_model_version"] == "sd_v2_v" and md["ss_v2"] == "True"
    assert md["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"


def test_locon_continue_and_sample(tiny_sd1_diffusers, dataset, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\nsks shape, red --w 64 --h 64 --d 3 --s 2\nsks shape --n blurry --w 64 --h 64 --s 2\n", encoding="utf-8")
    first = _train(tiny_config(tiny_sd1_diffusers, dataset, tmp_path / "a", network_args=["conv_dim=4", "conv_alpha=1"],
                               sample_prompts=str(prompts), sample_every_n_steps=2))
    sd = load_file(first.output_path)
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in sd
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[-2:] == (3, 3)
    samples = sorted(os.listdir(tmp_path / "a" / "sample"))
    assert any(s.startswith("tiny_000002_00_") and s.endswith("_3.png") for s in samples), samples
    assert any("_grid_" in s for s in samples)
    # continue from the file: rank, alpha and the conv modules come from its weights
    second = _train(tiny_config(tiny_sd1_diffusers, dataset, tmp_path / "b", network_weights=first.output_path,
                                dim_from_weights=True, max_train_steps=1, learning_rate=1e-9))
    sd2 = load_file(second.output_path)
    assert set(sd2) == set(sd)
    for k in sd:
        assert torch.allclose(sd[k].float(), sd2[k].float(), atol=1e-3), k


def _run_cli(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "sd_scripts.train_network", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_trains(tiny_sd1_diffusers, dataset, tmp_path):
    out = tmp_path / "out"
    proc = _run_cli(["--pretrained_model_name_or_path", str(tiny_sd1_diffusers), "--train_data_dir", str(dataset),
                     "--output_dir", str(out), "--output_name", "cli", "--resolution", "64", "--min_bucket_reso", "64",
                     "--max_bucket_reso", "64", "--max_train_steps", "2", "--network_dim", "2", "--seed", "1",
                     "--save_model_as", "pt", "--optimizer_args", "weight_decay=0.1", "betas=0.9,0.99"], ROOT)
    assert proc.returncode == 0, proc.stderr
    sd = torch.load(out / "cli.pt", weights_only=True)
    assert any(k.endswith(".lora_up.weight") for k in sd)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--pretrained_model_name_or_path", "/nope/model.safetensors"], "pretrained_model_name_or_path"),
        (["--train_data_dir", "/nope/data"], "train_data_dir"),
        (["--resolution", "100"], "resolution"),
        (["--cache_latents", "--color_aug"], "color_aug"),
        (["--optimizer_type", "NoSuchOptimizer"], "optimizer_type"),
        (["--network_train_unet_only", "--network_train_text_encoder_only"], "network_train_unet_only"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tiny_sd1_diffusers, dataset, tmp_path, extra, needle):
    out = tmp_path / "out"
    base = {"--pretrained_model_name_or_path": str(tiny_sd1_diffusers), "--train_data_dir": str(dataset),
            "--output_dir": str(out), "--resolution": "64", "--min_bucket_reso": "64", "--max_bucket_reso": "64",
            "--max_train_steps": "1"}
    args = []
    for k, v in base.items():
        if k not in extra:
            args += [k, v]
    before = tree_digest(dataset)
    proc = _run_cli(args + extra, ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) >= 1 and any(needle in l for l in lines), proc.stderr
    assert not out.exists(), "nothing may be written on a user error"
    assert tree_digest(dataset) == before


def test_checkpointing_te_only_and_separate_lrs(tiny_sd1_diffusers, dataset, tmp_path):
    """Gradient checkpointing gives the same LoRA as a plain run; TE-only writes only lora_te keys."""
    plain = _train(tiny_config(tiny_sd1_diffusers, dataset, tmp_path / "a", max_train_steps=2))
    ckpt = _train(tiny_config(tiny_sd1_diffusers, dataset, tmp_path / "b", max_train_steps=2, gradient_checkpointing=True))
    sa, sb = load_file(plain.output_path), load_file(ckpt.output_path)
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-5), k
    te_only = _train(tiny_config(tiny_sd1_diffusers, dataset, tmp_path / "c", max_train_steps=2,
                                 network_train_text_encoder_only=True, text_encoder_lr=5e-4))
    sc = load_file(te_only.output_path)
    assert sc and all(k.startswith("lora_te_") for k in sc)
    # a text-encoder lr of 0 freezes the text-encoder LoRA while the UNet LoRA trains
    frozen_te = _train(tiny_config(tiny_sd1_diffusers, dataset, tmp_path / "d", max_train_steps=2, text_encoder_lr=0.0,
                                   unet_lr=1e-3))
    sd = load_file(frozen_te.output_path)
    assert all(float(v.abs().max()) == 0 for k, v in sd.items() if k.startswith("lora_te_") and k.endswith("lora_up.weight"))
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if k.startswith("lora_unet_") and k.endswith("lora_up.weight"))
