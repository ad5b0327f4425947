"""Validation loss: the held-out split, the schedule, comparable numbers, no effect on what is trained."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import make_dataset, tiny_config


class FrozenAdamW(torch.optim.AdamW):
    """An optimizer that never changes the weights (the loop's lr 0 is refused as "nothing would train")."""

    def step(self, closure=None):
        return None


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("validation") / "data"
    make_dataset(root, folder="1_sks shape", count=8)
    make_dataset(root, folder="1_tiny", count=2)  # too small to hold one out at 0.25
    return root


@pytest.fixture(scope="module")
def reg(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("validation_reg") / "reg", folder="1_shape", count=4)


def _scan(model, data, out, **overrides):
    from sd_scripts.data.dataset_layout import scan_dataset

    return scan_dataset(tiny_config(model, data, out, **overrides))


def _train(config):
    from sd_scripts.training.loop import train

    return train(config)


def _names(records) -> list[str]:
    return sorted(os.path.basename(r.path) for r in records)


# ------------------------------------------------------------------------------------------------ the split


def test_split_is_deterministic_per_folder_and_never_takes_reg_images(tiny_sd1_diffusers, data, reg, tmp_path):
    plan = _scan(tiny_sd1_diffusers, data, tmp_path / "out", validation_split=0.25, reg_data_dir=str(reg))
    held = plan.validation_images
    assert len(held) == 2 and plan.num_validation_images == 2  # floor(8 * 0.25) from 1_sks shape, none from 1_tiny
    assert all("1_sks shape" in r.path for r in held)
    assert not any(r.is_reg for r in held)
    assert not {r.path for r in held} & {r.path for r in plan.images}, "held-out images must not be trained on"
    assert plan.num_train_images == 8  # 6 + 2 images x 1 repeat
    warning = [w for w in plan.warnings if w.startswith("validation_split:")]
    assert len(warning) == 1 and "1_tiny (2)" in warning[0]
    # the same settings choose the same images; another seed (validation_seed, else seed) other ones
    again = _scan(tiny_sd1_diffusers, data, tmp_path / "out", validation_split=0.25, reg_data_dir=str(reg))
    assert _names(again.validation_images) == _names(held)
    picks = {tuple(_names(_scan(tiny_sd1_diffusers, data, tmp_path / "out", validation_split=0.25,
                                validation_seed=s).validation_images)) for s in range(6)}
    assert len(picks) > 1
    by_seed = _scan(tiny_sd1_diffusers, data, tmp_path / "out", validation_split=0.25, seed=3)
    by_validation_seed = _scan(tiny_sd1_diffusers, data, tmp_path / "out", validation_split=0.25, validation_seed=3)
    assert _names(by_seed.validation_images) == _names(by_validation_seed.validation_images)


def test_split_helper_keeps_a_training_image():
    from types import SimpleNamespace

    from sd_scripts.data.held_out import split_held_out

    records = [SimpleNamespace(path=f"/d/{i}.png") for i in range(3)]
    train, held = split_held_out(records, 0.99, 1, "x")
    assert len(train) == 1 and len(held) == 2
    assert split_held_out(records, 0.0, 1, "x") == (records, [])
    assert split_held_out(records[:1], 0.5, 1, "x") == (records[:1], [])


def test_toml_keys_at_general_and_dataset_level(tiny_sd1_diffusers, data, tmp_path):
    toml = tmp_path / "d.toml"
    sub = (data / "1_sks shape").as_posix()
    toml.write_text(f'[general]\nvalidation_split = 0.5\n\n[[datasets]]\nresolution = 64\nvalidation_seed = 5\n'
                    f'[[datasets.subsets]]\nimage_dir = "{sub}"\n', encoding="utf-8")
    plan = _scan(tiny_sd1_diffusers, data, tmp_path / "out", dataset_config=str(toml), train_data_dir=None)
    assert len(plan.validation_images) == 4 and not any("not supported" in w for w in plan.warnings)
    same = _scan(tiny_sd1_diffusers, data, tmp_path / "out", validation_split=0.5, validation_seed=5)
    assert _names(plan.validation_images) == _names(r for r in same.validation_images if "1_sks shape" in r.path)
    toml.write_text(f'[[datasets]]\nresolution = 64\nvalidation_split = 1.0\n'
                    f'[[datasets.subsets]]\nimage_dir = "{sub}"\n', encoding="utf-8")
    from sd_scripts.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^validation_split \(dataset_config \[\[datasets\]\] #1\): must be from 0"):
        _scan(tiny_sd1_diffusers, data, tmp_path / "out", dataset_config=str(toml), train_data_dir=None)


@pytest.mark.parametrize("setting, value, needle", [
    ("validation_split", -0.1, "validation_split: must be from 0"),
    ("validation_split", 1.0, "validation_split: must be from 0"),
    ("validate_every_n_steps", 0, "validate_every_n_steps: must be a whole number of 1 or more"),
    ("validate_every_n_epochs", -1, "validate_every_n_epochs: must be a whole number of 1 or more"),
    ("max_validation_steps", 0, "max_validation_steps: must be a whole number of 1 or more"),
])
def test_bad_values_are_one_line_errors(tiny_sd1_diffusers, data, tmp_path, setting, value, needle):
    from sd_scripts.core.errors import UserError
    from sd_scripts.training.preflight import preflight

    with pytest.raises(UserError) as info:
        preflight(tiny_config(tiny_sd1_diffusers, data, tmp_path / "out", **{setting: value}))
    lines = str(info.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith(needle), lines


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_held_out_images_are_never_in_training_batches(tiny_sd1_diffusers, data, tmp_path, monkeypatch):
    from sd_scripts.training import loop as train_loop

    seen: list[str] = []
    original = train_loop._Trainer._step_loss

    def spy(self, batch):
        seen.extend(batch["image_paths"])
        return original(self, batch)

    monkeypatch.setattr(train_loop._Trainer, "_step_loss", spy)
    config = tiny_config(tiny_sd1_diffusers, data, tmp_path / "out", validation_split=0.25, max_train_epochs=2,
                         train_batch_size=2, max_train_steps=100)
    held = {r.path for r in _scan(tiny_sd1_diffusers, data, tmp_path / "out", validation_split=0.25).validation_images}
    result = _train(config)
    assert len(seen) == 16 and not held & set(seen)  # 8 training images x 2 epochs
    assert [step for step, _ in result.validation_losses] == [4, 8]  # the end of every epoch


@pytest.mark.slow
def test_validation_is_logged_and_repeats_exactly_when_weights_do_not_move(tiny_sd1_diffusers, data, tmp_path):
    from tests.test_logging import _scalars

    logs = tmp_path / "logs"
    messages: list[str] = []

    class Callbacks:
        def on_message(self, text):
            messages.append(text)

    from sd_scripts.training.loop import train

    config = tiny_config(tiny_sd1_diffusers, data, tmp_path / "out", validation_split=0.25, validate_every_n_steps=2,
                         max_train_steps=5, logging_dir=str(logs), optimizer_type="tests.test_validation.FrozenAdamW",
                         network_dropout=0.5)
    result = train(config, Callbacks())
    # every 2 steps, and at the end of the run (the end of its last epoch)
    assert [step for step, _ in result.validation_losses] == [2, 4, 5]
    values = [v for _, v in result.validation_losses]
    assert values[0] > 0 and values == [values[0]] * 3, "fixed noise and timesteps, eval mode: the same number"
    s = _scalars(logs)
    assert sorted(s["loss/validation"]) == [2, 4, 5]
    assert sorted(s["loss/validation/step_average"]) == [2, 4]
    assert sorted(s["loss/validation/epoch_average"]) == [4, 5]  # 4 batches per epoch
    assert s["loss/validation"][2] == pytest.approx(values[0], rel=1e-6)
    assert "loss/validation/step_divergence" in s and "loss/validation/epoch_divergence" in s
    assert sum("validation loss" in m for m in messages) == 3
    from safetensors import safe_open

    with safe_open(result.output_path, "pt") as f:
        md = f.metadata()
    assert md["ss_num_validation_images"] == "2" and md["ss_validation_split"] == "0.25"
    assert md["ss_validate_every_n_steps"] == "2" and md["ss_validation_seed"] == "None"
    assert result.plot_path and os.path.isfile(result.plot_path)


def test_validation_uses_the_training_loss_type_and_weightings(tiny_sd1_diffusers, data, tmp_path):
    """As kohya's validation: loss_type and the SNR weightings apply (the noise stays plain Gaussian)."""
    def validation(**kw):
        config = tiny_config(tiny_sd1_diffusers, data, tmp_path / "out", validation_split=0.25, max_train_steps=1,
                             optimizer_type="tests.test_validation.FrozenAdamW", **kw)
        return _train(config).validation_losses[-1][1]

    plain = validation()
    assert validation(loss_type="l1") != pytest.approx(plain, rel=1e-3)
    # min-SNR with gamma 1 weighs every fixed timestep (SNR > 1 at t = 200) by 1/SNR < 1
    assert validation(min_snr_gamma=1.0) < plain


@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True])
def test_the_lora_is_bit_identical_with_and_without_validation(tiny_sd1_diffusers, data, tmp_path, cache):
    """Validation draws nothing from the training random streams: the same split trains the same LoRA
    whether or not validations run, and the same as a dataset that simply lacks the held-out images."""
    from safetensors.torch import load_file

    from sd_scripts.training import loop as train_loop

    settings = dict(validation_split=0.25, max_train_steps=6, network_dropout=0.2, cache_latents=cache,
                    flip_aug=True)
    held = {r.path for r in _scan(tiny_sd1_diffusers, data, tmp_path / "x", **settings).validation_images}
    with_validation = _train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "a", validate_every_n_steps=1, **settings))
    assert len(with_validation.validation_losses) == 6
    # the same run, its validations not computed
    original = train_loop._Trainer._validation_loss
    train_loop._Trainer._validation_loss = lambda self: 0.0
    try:
        without = _train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "b", validate_every_n_steps=1, **settings))
    finally:
        train_loop._Trainer._validation_loss = original
    # a copy of the dataset without the held-out images, no validation at all
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    for path in held:
        os.remove(copy / Path(path).relative_to(data))
    plain = _train(tiny_config(tiny_sd1_diffusers, copy, tmp_path / "c", **{**settings, "validation_split": 0.0}))
    a, b, c = (load_file(r.output_path) for r in (with_validation, without, plain))
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a[k], c[k]), k


def test_kohya_command_line_flags():
    from sd_scripts.train_network import config_from_args

    config = config_from_args(["--validation_split", "0.2", "--validation_seed", "3", "--validate_every_n_steps", "10",
                               "--validate_every_n_epochs", "2", "--max_validation_steps", "4"])
    assert (config.validation_split, config.validation_seed, config.validate_every_n_steps,
            config.validate_every_n_epochs, config.max_validation_steps) == (0.2, 3, 10, 2, 4)
    assert config_from_args([]).validation_split == 0.0


@pytest.mark.slow
def test_sdxl_with_cached_text_encoder_outputs_and_latents(tiny_sdxl_diffusers, tmp_path):
    """The held-out images' captions are in the text-encoder output cache and their latents in the latent cache."""
    data = make_dataset(tmp_path / "data", folder="1_sks shape", count=4)
    for i, caption in enumerate(sorted((data / "1_sks shape").glob("*.txt"))):
        caption.write_text(f"sks shape, picture {i}", encoding="utf-8")  # every caption its own
    config = tiny_config(tiny_sdxl_diffusers, data, tmp_path / "out", resolution="64", min_bucket_reso=32,
                         max_bucket_reso=128, bucket_reso_steps=32, validation_split=0.5, validate_every_n_steps=1,
                         max_train_steps=2, network_train_unet_only=True, cache_text_encoder_outputs=True,
                         cache_latents=True)
    from sd_scripts.data.dataset_layout import scan_dataset
    from sd_scripts.data.te_cache import fixed_captions

    plan = scan_dataset(config)
    assert len(plan.validation_images) == 2
    assert sorted(fixed_captions(plan)) == [f"sks shape, picture {i}" for i in range(4)]
    result = _train(config)
    values = [v for _, v in result.validation_losses]
    assert len(values) == 2 and all(v > 0 and v == v for v in values)


def test_the_wizard_asks_for_a_validation_split(tmp_path):
    from ArgsList import ArgStore
    from popups.asker import ScriptedAsker
    from popups.training_flow import TrainingWizard

    data = make_dataset(tmp_path / "data")
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"not read by the wizard")
    script = {"base_model": str(model), "img_folder": str(data), "output_folder": str(tmp_path / "out"),
              "validation_split": [1.5, 0.25]}
    asker = ScriptedAsker(script)
    store = TrainingWizard(asker, ArgStore()).run()
    assert store.validation_split == 0.25
    asked = asker.questions("validation_split")
    assert len(asked) == 2 and "below 1" in asked[1].error
    assert asker.keys.index("validation_split") < asker.keys.index("summary")


@pytest.mark.slow
@pytest.mark.parametrize("step", [3, 4])
def test_resume_with_validation_is_bit_identical(tiny_sd1_diffusers, data, tmp_path, step):
    """Resumed mid-epoch (3) and after an epoch's last step (4: that state was saved before the epoch's end,
    so the resumed run ends the epoch, its validation included). The validation history continues."""
    from safetensors.torch import load_file

    settings = dict(validation_split=0.25, validate_every_n_steps=3, max_train_steps=8, network_dropout=0.1,
                    lr_scheduler="cosine")
    reference = _train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "a", save_state=True, save_every_n_steps=1,
                                   **settings))
    assert [s for s, _ in reference.validation_losses] == [3, 4, 6, 8]
    resumed = _train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "b",
                                 resume=str(tmp_path / "a" / f"tiny-step{step:08d}-state"), **settings))
    a, b = load_file(reference.output_path), load_file(resumed.output_path)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.validation_losses == reference.validation_losses  # the same numbers, the history from the state


def test_fixed_timesteps_follow_kohya():
    from types import SimpleNamespace

    from sd_scripts.training.validation import VALIDATION_TIMESTEPS, validation_timesteps

    assert validation_timesteps(SimpleNamespace()) == VALIDATION_TIMESTEPS == (200, 400, 600, 800)
    assert validation_timesteps(SimpleNamespace(min_timestep=100, max_timestep=600)) == (200, 300, 400, 500)
    assert validation_timesteps(SimpleNamespace(min_timestep=500, max_timestep=500)) == (500,)
