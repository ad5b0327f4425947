"""Shared fixtures: tiny SD models built in code (no downloads), one torch thread."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sd1_diffusers(tmp_path_factory) -> Path:
    """A tiny SD1-shaped model as a diffusers folder."""
    from sd_scripts.testing.tiny_models import save_tiny_diffusers

    return save_tiny_diffusers(tmp_path_factory.mktemp("tiny_sd1") / "model", "sd1")


@pytest.fixture(scope="session")
def tiny_sd2_diffusers(tmp_path_factory) -> Path:
    """A tiny SD2-shaped v-prediction model as a diffusers folder."""
    from sd_scripts.testing.tiny_models import save_tiny_diffusers

    return save_tiny_diffusers(tmp_path_factory.mktemp("tiny_sd2") / "model", "sd2", v_prediction=True)


@pytest.fixture(scope="session")
def tiny_sd1_single_file(tmp_path_factory) -> Path:
    """A tiny SD1-shaped model as model.safetensors + model.yaml; tokenizer in tiny_tokenizer_cache_dir(path)."""
    from sd_scripts.testing.tiny_models import save_tiny_single_file

    return save_tiny_single_file(tmp_path_factory.mktemp("tiny_sd1_sf") / "model.safetensors", "sd1")


@pytest.fixture(scope="session")
def tiny_sd2_single_file(tmp_path_factory) -> Path:
    """A tiny SD2-shaped v-prediction model as model.safetensors + model.yaml (parameterization v)."""
    from sd_scripts.testing.tiny_models import save_tiny_single_file

    return save_tiny_single_file(tmp_path_factory.mktemp("tiny_sd2_sf") / "model.safetensors", "sd2", v_prediction=True)


@pytest.fixture(scope="session")
def tiny_sdxl_diffusers(tmp_path_factory) -> Path:
    """A tiny SDXL-shaped model as a diffusers folder (two text encoders, text_time conditioning)."""
    from sd_scripts.testing.tiny_models import save_tiny_diffusers

    return save_tiny_diffusers(tmp_path_factory.mktemp("tiny_sdxl") / "model", "sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_single_file(tmp_path_factory) -> Path:
    """A tiny SDXL-shaped model as model.safetensors + its SGM model.yaml; tokenizers in tiny_tokenizer_cache_dir(path)."""
    from sd_scripts.testing.tiny_models import save_tiny_single_file

    return save_tiny_single_file(tmp_path_factory.mktemp("tiny_sdxl_sf") / "model.safetensors", "sdxl")


@pytest.fixture(scope="session")
def tiny_flux_files(tmp_path_factory) -> dict:
    """A tiny FLUX.1 dev: BFL transformer file + clip_l/t5xxl/ae files + tokenizer_cache_dir (paths by name)."""
    from sd_scripts.testing.tiny_flux import save_tiny_flux_files

    return save_tiny_flux_files(tmp_path_factory.mktemp("tiny_flux_dev"))


@pytest.fixture(scope="session")
def tiny_flux_schnell_files(tmp_path_factory) -> dict:
    """A tiny FLUX.1 schnell (no guidance embedding), as ``tiny_flux_files``."""
    from sd_scripts.testing.tiny_flux import save_tiny_flux_files

    return save_tiny_flux_files(tmp_path_factory.mktemp("tiny_flux_schnell"), dev=False)

