"""One tiny SDXL training through ``main.py``: ArgStore settings -> TrainConfig -> the engine -> an SDXL LoRA file."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from tests.helpers import make_dataset

pytestmark = pytest.mark.slow


def test_main_trains_a_tiny_sdxl_lora_unet_only_with_text_encoder_cache(tiny_sdxl_diffusers, tmp_path, capsys):
    import main

    data = make_dataset(tmp_path / "data", count=2, size=(64, 64))
    out = tmp_path / "out"
    code = main.main([
        "--base_model", str(tiny_sdxl_diffusers), "--img_folder", str(data), "--output_folder", str(out),
        "--change_output_name", "xl", "--train_resolution", "64", "--min_bucket_resolution", "32",
        "--max_bucket_resolution", "128", "--bucket_reso_steps", "32", "--max_steps", "2", "--batch_size", "2",
        "--net_dim", "2", "--alpha", "1", "--optimizer_type", "AdamW", "--mixed_precision", "no", "--xformers", "false",
        "--num_workers", "0", "--unet_only", "--cache_text_encoder_outputs", "--no_half_vae", "--sdxl", "--test_seed", "3",
    ])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "note: the base model is SDXL" not in printed.out  # every size was given, so none was changed
    path = out / "xl.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        keys = list(f.keys())
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert keys and all(k.startswith("lora_unet_") for k in keys)  # unet_only
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # kohya's SDXL (SGM) names
    saved = json.loads((out / "xl_settings.json").read_text(encoding="utf-8"))
    assert saved["cache_text_encoder_outputs"] is True and saved["no_half_vae"] is True and saved["sdxl"] is True
