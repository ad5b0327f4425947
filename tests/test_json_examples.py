"""Every example JSON in examples/ (and the queue example) loads and passes the settings checks."""

from __future__ import annotations

import glob
import os

import pytest

from frontend.job_queue import list_jobs
from frontend.resolve import resolve_settings, validate_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.json"))
                  + glob.glob(os.path.join(ROOT, "examples", "queue", "*.json")))


def test_the_promised_examples_exist():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"first_lora.json", "locon.json", "dadaptation.json", "samples_during_training.json",
            "sdxl_lora.json", "flux_lora.json"} <= names
    assert len(list_jobs(os.path.join(ROOT, "examples", "queue"))) >= 2


@pytest.fixture(scope="module")
def quickstart_model() -> str:
    """The examples train the quick-start model; build it as the quick start does when it is missing."""
    from sd_scripts.testing.tiny_flux import save_tiny_flux_diffusers
    from sd_scripts.testing.tiny_models import save_tiny_diffusers

    for name, family in (("model", "sd1"), ("model_sdxl", "sdxl"), ("model_flux", "flux")):
        folder = os.path.join(ROOT, "examples", "quickstart", name)
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            if family == "flux":
                save_tiny_flux_diffusers(folder, seed=0)
            else:
                save_tiny_diffusers(folder, family, seed=0)
    return os.path.join(ROOT, "examples", "quickstart", "model")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: os.path.relpath(p, ROOT))
def test_example_loads_and_checks(path, tmp_path, monkeypatch, quickstart_model):
    monkeypatch.chdir(ROOT)  # the examples name their files from the repository folder, as run there
    resolved = resolve_settings({"load_json_path": path})
    assert resolved.warnings == [], resolved.warnings
    store = resolved.store
    assert os.path.isdir(store.img_folder), store.img_folder
    if store.sample_prompts:
        assert os.path.isfile(store.sample_prompts)
    validate_store(store)
