"""FLUX.1 settings mistakes stop before the model loads: one line naming the setting and the fix."""

from __future__ import annotations

import pytest

from helpers import flux_settings, make_dataset, tiny_config
from sd_scripts.core.errors import UserErrors
from sd_scripts.training.preflight import preflight


def _config(files, tmp_path, **overrides):
    data = make_dataset(tmp_path / "data", size=(64, 64))
    values = flux_settings(files) | {"resolution": "64", "bucket_reso_steps": 64}
    values.update(overrides)
    return tiny_config(files["transformer"], data, tmp_path / "out", **values)


def _errors(config) -> list[str]:
    with pytest.raises(UserErrors) as e:
        preflight(config)
    lines = [str(err) for err in e.value.errors]
    assert all("\n" not in line for line in lines)
    return lines


def _one(lines, setting, *words):
    hits = [line for line in lines if line.startswith(setting + ":") and all(w in line for w in words)]
    assert hits, lines


def test_good_settings_pass(tiny_flux_files, tmp_path):
    plan = preflight(_config(tiny_flux_files, tmp_path))
    assert plan.family.name == "flux" and plan.model_info["flux_variant"] == "dev"


def test_missing_parts_are_named(tiny_flux_files, tmp_path):
    lines = _errors(_config(tiny_flux_files, tmp_path, clip_l=None, t5xxl=None, ae=str(tmp_path / "none.safetensors")))
    _one(lines, "clip_l", "holds only the FLUX.1 transformer", "clip_l.safetensors")
    _one(lines, "t5xxl", "t5xxl_fp16.safetensors")
    _one(lines, "ae", "does not exist")


def test_schnell_with_guidance_and_a_dev_override(tiny_flux_schnell_files, tmp_path):
    lines = _errors(_config(tiny_flux_schnell_files, tmp_path, guidance_scale=4.0, flux_variant="dev"))
    _one(lines, "guidance_scale", "no guidance embedding", "unset guidance_scale")
    _one(lines, "flux_variant", "schnell")


def test_t5_length_resolution_and_sd_only_settings(tiny_flux_files, tmp_path):
    lines = _errors(_config(tiny_flux_files, tmp_path, t5xxl_max_token_length=600, resolution="1000",
                            v_parameterization=True, clip_skip=2, min_snr_gamma=5.0, timestep_sampling="cosine"))
    _one(lines, "t5xxl_max_token_length", "512")
    _one(lines, "resolution", "multiple of 16", "992")
    _one(lines, "v_parameterization", "flow matching")
    _one(lines, "clip_skip", "unset clip_skip")
    _one(lines, "min_snr_gamma", "weighting_scheme")
    _one(lines, "timestep_sampling", "sigma")


def test_main_refuses_in_one_line_with_exit_2_and_writes_nothing(tiny_flux_files, tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "out"
    args = [sys.executable, os.path.join(root, "main.py"), "--base_model", str(tiny_flux_files["transformer"]),
            "--img_folder", str(data), "--output_folder", str(out), "--t5xxl", str(tiny_flux_files["t5xxl"]),
            "--ae", str(tiny_flux_files["ae"]), "--tokenizer_cache_dir", str(tiny_flux_files["tokenizer_cache_dir"]),
            "--train_resolution", "1000"]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": root, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line.removeprefix("error: ") for line in result.stderr.splitlines()]
    assert any(line.startswith("clip_l:") for line in errors), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_flux_network_args_are_checked_against_the_models_blocks(tiny_flux_files, tmp_path):
    """kohya's block indices are bounded by the blocks detection counts in the file, before the model loads."""
    lines = _errors(_config(tiny_flux_files, tmp_path, network_module="networks.lora",
                            network_args=["train_double_block_indices=0-2"]))
    _one(lines, "network_args", "train_double_block_indices=0-2 has block 2", "2 double blocks (0-1)")
    plan = preflight(_config(tiny_flux_files, tmp_path, network_module="networks.lora",
                             network_args=["train_blocks=double", "train_single_block_indices=0",
                                           "in_dims=[4,0,0,0,4]"]))
    assert any(w.startswith("network_args: train_single_block_indices does nothing with train_blocks=double")
               for w in plan.warnings), plan.warnings
