"""Schedule-free optimizers: saving and sampling use the evaluation weights and leave training untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import make_dataset, tiny_config

pytestmark = pytest.mark.slow

SF = "tests.fake_optimizers.AdamWScheduleFree"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("sf") / "data", folder="1_sks shape", count=4)


def test_eval_weights_for_saves_and_samples_training_untouched(tiny_sd1_diffusers, data, tmp_path, monkeypatch):
    from sd_scripts.files import lora_file
    from sd_scripts.training import sampling
    from sd_scripts.training.loop import train
    from tests.fake_optimizers import AdamWScheduleFree

    modes: list[tuple[str, str]] = []
    real_save, real_generate = lora_file.save_lora_file, sampling.generate_samples

    def current_mode():
        return "eval" if AdamWScheduleFree.calls and AdamWScheduleFree.calls[-1] == "eval" else "train"

    def save(*args, **kwargs):
        modes.append(("save", current_mode()))
        return real_save(*args, **kwargs)

    def generate(*args, **kwargs):
        modes.append(("sample", current_mode()))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(lora_file, "save_lora_file", save)
    monkeypatch.setattr(sampling, "generate_samples", generate)
    prompts = tmp_path / "p.txt"
    prompts.write_text("sks shape --w 64 --h 64 --s 2\n", encoding="utf-8")
    base = dict(optimizer_type=SF, max_train_steps=4)
    plain = train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "plain", **base))
    busy = train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "busy", save_every_n_steps=1, save_state=True,
                             sample_prompts=str(prompts), sample_every_n_steps=1, **base))
    assert modes and all(mode == "eval" for _, mode in modes), modes
    assert {"save", "sample"} == {what for what, _ in modes}
    assert AdamWScheduleFree.calls[-1] == "train"
    a, b = load_file(plain.output_path), load_file(busy.output_path)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: saving/sampling changed the training weights"
    # the state holds the training weights: resuming continues exactly
    resumed = train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "resumed",
                                resume=str(tmp_path / "busy" / "tiny-step00000002-state"), **base))
    c = load_file(resumed.output_path)
    for k in a:
        assert torch.equal(a[k], c[k]), k
