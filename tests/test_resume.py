"""Exact resume: a run stopped after a saved state and resumed ends with a bit-identical LoRA."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers import make_dataset, tiny_config

pytestmark = pytest.mark.slow

# 4 images, 1 repeat, batch 2: 2 batches per epoch, so 6 steps cross two epoch boundaries.
BASE = dict(max_train_steps=6, lr_scheduler="cosine", lr_warmup_steps=2, network_dropout=0.1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("resume") / "data", folder="1_sks shape", count=4)


@pytest.fixture(scope="module")
def reference(tiny_sd1_diffusers, data, tmp_path_factory):
    """One uninterrupted run that saves a LoRA and a state at every step."""
    from sd_scripts.training.loop import train

    out = tmp_path_factory.mktemp("reference")
    result = train(tiny_config(tiny_sd1_diffusers, data, out, save_state=True, save_every_n_steps=1, **BASE))
    return out, result


def _train(model, data, out, **overrides):
    from sd_scripts.training.loop import train

    return train(tiny_config(model, data, out, **{**BASE, **overrides}))


def _same(a: str, b: str) -> None:
    sa, sb = load_file(a), load_file(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


def _metadata(path: str) -> dict:
    with safe_open(path, "pt") as f:
        return f.metadata()


def test_state_folders_are_named_as_kohya_and_complete(reference):
    out, result = reference
    names = sorted(os.listdir(out))
    assert {n for n in names if n.endswith("-state")} == {f"tiny-step{s:08d}-state" for s in range(1, 6)} | {"tiny-state"}
    assert not [n for n in names if n.startswith(".")], "no temporary files may remain"
    info = json.loads((out / "tiny-step00000003-state" / "train_state.json").read_text())
    assert info["global_step"] == info["current_step"] == 3
    assert info["epoch"] == 2 and info["batches_done"] == 1  # step 3 is the first batch of epoch 2
    assert set(os.listdir(out / "tiny-state")) == {"train_state.json", "network.safetensors", "training.pt"}
    assert result.global_step == 6 and result.epochs == 3
    assert (out / "tiny-loss.png").is_file()


@pytest.mark.parametrize("step", [1, 2, 3, 5])
def test_resume_from_any_step_is_bit_identical(tiny_sd1_diffusers, data, reference, tmp_path, step):
    """Mid-epoch (1, 3, 5) and at an epoch's end (2) positions."""
    out, ref = reference
    result = _train(tiny_sd1_diffusers, data, tmp_path, resume=str(out / f"tiny-step{step:08d}-state"))
    assert result.global_step == 6 and result.epochs == 3
    _same(ref.output_path, result.output_path)
    md = _metadata(result.output_path)
    assert md["ss_steps"] == "6" and md["ss_epoch"] == "3"
    assert len(result.losses) == 6, "the loss history continues from the state"


class _CtrlCAt:
    """Callbacks that press Ctrl+C (SIGINT to this process) when step ``step`` is done."""

    def __init__(self, step: int):
        self.step = step

    def on_progress(self, step, total, loss, lr, epoch):
        if step == self.step:
            import signal

            os.kill(os.getpid(), signal.SIGINT)


def test_stopped_twice_and_resumed_counters_continue(tiny_sd1_diffusers, data, reference, tmp_path):
    """Ctrl+C at step 2, resume and Ctrl+C at step 3, resume to the end: same LoRA, counters continue."""
    from sd_scripts.training.loop import TrainingInterrupted, train

    out, ref = reference
    with pytest.raises(TrainingInterrupted) as first:
        train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "1", save_state=True, **BASE), _CtrlCAt(2))
    assert first.value.state_path == str(tmp_path / "1" / "tiny-step00000002-state")
    with pytest.raises(TrainingInterrupted) as second:
        train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "2", save_state=True, resume=first.value.state_path,
                          **BASE), _CtrlCAt(3))
    info = json.loads((Path(second.value.state_path) / "train_state.json").read_text())
    assert info["global_step"] == 3 and info["epoch"] == 2 and info["batches_done"] == 1
    third = _train(tiny_sd1_diffusers, data, tmp_path / "3", resume=second.value.state_path)
    assert third.global_step == 6 and third.epochs == 3
    md = _metadata(third.output_path)
    assert md["ss_steps"] == "6" and md["ss_epoch"] == "3"
    _same(ref.output_path, third.output_path)


def test_resume_twice_with_the_same_settings(tiny_sd1_diffusers, data, reference, tmp_path):
    out, ref = reference
    a = _train(tiny_sd1_diffusers, data, tmp_path / "a", resume=str(out / "tiny-step00000001-state"),
               save_state=True, save_every_n_steps=3)
    b = _train(tiny_sd1_diffusers, data, tmp_path / "b", resume=str(tmp_path / "a" / "tiny-step00000003-state"))
    _same(ref.output_path, a.output_path)
    _same(ref.output_path, b.output_path)


def test_epoch_states_and_save_last_n(tiny_sd1_diffusers, data, tmp_path):
    result = _train(tiny_sd1_diffusers, data, tmp_path, save_state=True, save_every_n_epochs=1,
                    save_last_n_epochs=1, save_last_n_epochs_state=1)
    names = sorted(os.listdir(tmp_path))
    # epochs 1 and 2 were saved; only the last one is kept (kohya: epoch - every * n and older go)
    assert "tiny-000002.safetensors" in names and "tiny-000002-state" in names
    assert "tiny-000001.safetensors" not in names and "tiny-000001-state" not in names
    info = json.loads((tmp_path / "tiny-000002-state" / "train_state.json").read_text())
    assert info["epoch"] == 2 and info["batches_done"] == 2 and info["epoch_end_done"] is True
    resumed = _train(tiny_sd1_diffusers, data, tmp_path / "r", resume=str(tmp_path / "tiny-000002-state"))
    _same(result.output_path, resumed.output_path)


def test_save_last_n_steps_state(tiny_sd1_diffusers, data, tmp_path):
    _train(tiny_sd1_diffusers, data, tmp_path, save_state=True, save_every_n_steps=1, save_last_n_steps=1,
           save_last_n_steps_state=2, max_train_steps=5)
    names = sorted(os.listdir(tmp_path))
    assert [n for n in names if n.startswith("tiny-step") and n.endswith(".safetensors")] == [
        "tiny-step00000003.safetensors", "tiny-step00000004.safetensors"]
    assert [n for n in names if n.startswith("tiny-step") and n.endswith("-state")] == [
        "tiny-step00000002-state", "tiny-step00000003-state", "tiny-step00000004-state"]


def test_gradient_accumulation_resume(tiny_sd1_diffusers, data, tmp_path):
    a = _train(tiny_sd1_diffusers, data, tmp_path / "a", gradient_accumulation_steps=2, train_batch_size=1,
               max_train_steps=5, save_state=True, save_every_n_steps=1)
    for step in (1, 3):
        b = _train(tiny_sd1_diffusers, data, tmp_path / f"b{step}", gradient_accumulation_steps=2, train_batch_size=1,
                   max_train_steps=5, resume=str(tmp_path / "a" / f"tiny-step{step:08d}-state"))
        _same(a.output_path, b.output_path)


@pytest.mark.parametrize(
    "extra",
    [
        dict(token_warmup_step=4, token_warmup_min=1, shuffle_caption=True, caption_tag_dropout_rate=0.2),
        dict(cache_latents=True, network_train_unet_only=True, flip_aug=True),
        dict(max_data_loader_n_workers=1, persistent_data_loader_workers=True),
        dict(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, noise_offset=0.1,
             noise_offset_random_strength=True, adaptive_noise_scale=0.01, loss_type="huber"),
    ],
    ids=["token-warmup", "cached-latents-frozen-te", "loader-worker", "random-noise-strengths"],
)
def test_resume_variants(tiny_sd1_diffusers, data, tmp_path, extra):
    a = _train(tiny_sd1_diffusers, data, tmp_path / "a", save_state=True, save_every_n_steps=3, **extra)
    b = _train(tiny_sd1_diffusers, data, tmp_path / "b", resume=str(tmp_path / "a" / "tiny-step00000003-state"), **extra)
    _same(a.output_path, b.output_path)


def test_find_latest_state(reference, tmp_path):
    from sd_scripts.training.state import find_latest_state

    out, _ = reference
    assert find_latest_state(out, "tiny") == str(out / "tiny-state")
    assert find_latest_state(out, "other") is None
    assert find_latest_state(tmp_path) is None


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: p.mkdir(), "not a training state folder"),
        (lambda p: (p.mkdir(), (p / "optimizer.bin").write_bytes(b"x")), "accelerate/kohya state"),
        (lambda p: (p.mkdir(), (p / "train_state.json").write_text("{oops")), "cannot be read"),
        (lambda p: None, "state folder not found"),
    ],
)
def test_bad_resume_folder_is_a_one_line_error(tiny_sd1_diffusers, data, tmp_path, monkeypatch, make, needle):
    from sd_scripts.models import loading as model_loading
    from sd_scripts.core.errors import UserError

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(model_loading, "load_model", no_load)
    state = tmp_path / "tiny-state"
    make(state)
    with pytest.raises(UserError) as err:
        _train(tiny_sd1_diffusers, data, tmp_path / "out", resume=str(state))
    assert "resume" in str(err.value) and needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_resume_with_other_network_settings_is_refused(tiny_sd1_diffusers, data, reference, tmp_path, monkeypatch):
    from sd_scripts.models import loading as model_loading
    from sd_scripts.core.errors import UserError

    monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    out, _ = reference
    with pytest.raises(UserError) as err:
        _train(tiny_sd1_diffusers, data, tmp_path, resume=str(out / "tiny-state"), network_dim=8)
    assert "network_dim=4 (now 8)" in str(err.value)
    with pytest.raises(UserError) as err:
        _train(tiny_sd1_diffusers, data, tmp_path, resume=str(out / "tiny-state"), optimizer_type="Lion")
    assert "optimizer_type" in str(err.value)


def test_run_without_save_state_never_prunes_states(tiny_sd1_diffusers, data, reference, tmp_path):
    """Resuming without save_state in the same folder: save_last_n_steps prunes LoRAs, never the states."""
    import shutil

    out, _ = reference
    shutil.copytree(out / "tiny-step00000001-state", tmp_path / "tiny-step00000001-state")
    _train(tiny_sd1_diffusers, data, tmp_path, resume=str(tmp_path / "tiny-step00000001-state"), save_every_n_steps=1,
           save_last_n_steps=1)
    assert (tmp_path / "tiny-step00000001-state").is_dir()
    assert sorted(p.name for p in tmp_path.glob("tiny-step*.safetensors")) == ["tiny-step00000004.safetensors",
                                                                               "tiny-step00000005.safetensors"]
