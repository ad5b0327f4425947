"""Logging and plots: TensorBoard scalars read back with tensorboard's own reader, W&B when installed, the loss PNG."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import make_dataset, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("logging") / "data", folder="1_sks shape", count=4)


def _scalars(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    event_dirs = {Path(root) for root, _, files in os.walk(logdir) if any(f.startswith("events.out.tfevents") for f in files)}
    assert event_dirs, f"no event file under {logdir}"
    for d in event_dirs:
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def test_tensorboard_scalars(tiny_sd1_diffusers, data, tmp_path):
    from sd_scripts.training.loop import train

    logs = tmp_path / "logs"
    result = train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "out", logging_dir=str(logs), log_prefix="run1-",
                               max_train_steps=6, text_encoder_lr=5e-4))
    runs = os.listdir(logs)  # kohya's layout: <logging_dir>/<log_prefix><time>/network_train/
    assert len(runs) == 1 and runs[0].startswith("run1-") and os.listdir(logs / runs[0]) == ["network_train"]
    s = _scalars(logs)
    assert {"loss/current", "loss/average", "loss/epoch_average", "lr/textencoder", "lr/unet", "images_per_second"} <= set(s)
    assert sorted(s["loss/current"]) == [1, 2, 3, 4, 5, 6]
    for step, value in s["loss/current"].items():
        assert value == pytest.approx(result.losses[step - 1], rel=1e-6)
    # 2 batches per epoch: the moving average covers the last 2 steps, the epoch average each epoch
    assert s["loss/average"][4] == pytest.approx((result.losses[2] + result.losses[3]) / 2, rel=1e-6)
    assert sorted(s["loss/epoch_average"]) == [2, 4, 6]
    assert s["loss/epoch_average"][6] == pytest.approx(sum(result.losses[4:6]) / 2, rel=1e-6)
    assert list(s["lr/textencoder"].values()) == pytest.approx([5e-4] * 6)
    assert list(s["lr/unet"].values()) == pytest.approx([1e-3] * 6)
    assert all(v > 0 for v in s["images_per_second"].values())


def test_resumed_run_logs_continue_the_step_count(tiny_sd1_diffusers, data, tmp_path):
    from sd_scripts.training.loop import train

    train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "a", max_train_steps=2, save_state=True))
    logs = tmp_path / "logs"
    train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "b", max_train_steps=4, logging_dir=str(logs),
                      resume=str(tmp_path / "a" / "tiny-state")))
    assert sorted(_scalars(logs)["loss/current"]) == [3, 4]


def test_tensorboard_without_logging_dir_is_refused(tiny_sd1_diffusers, data, tmp_path):
    from sd_scripts.core.errors import UserError
    from sd_scripts.training.loop import train

    with pytest.raises(UserError, match="log_with: tensorboard writes TensorBoard logs, which need logging_dir"):
        train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "out", log_with="tensorboard"))
    assert not (tmp_path / "out").exists()


def test_lr_free_optimizer_logs_d_times_lr(tiny_sd1_diffusers, data, tmp_path):
    from sd_scripts.training.loop import train

    logs = tmp_path / "logs"
    train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "out", logging_dir=str(logs), optimizer_type="DAdaptAdam",
                      learning_rate=1.0, max_train_steps=2, network_train_unet_only=True))
    s = _scalars(logs)
    assert "lr/d*lr/unet" in s and all(v > 0 for v in s["lr/d*lr/unet"].values())


def test_wandb_offline(tiny_sd1_diffusers, data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from sd_scripts.training.loop import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    result = train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "out", log_with="wandb", max_train_steps=2))
    assert not any("logging disabled" in w for w in result.warnings), result.warnings
    assert any(p.name.startswith("offline-run") for p in (tmp_path / "wandb" / "wandb").iterdir())


def test_loss_plot_beside_the_lora(tiny_sd1_diffusers, data, tmp_path):
    from PIL import Image

    from sd_scripts.training.loop import train

    result = train(tiny_config(tiny_sd1_diffusers, data, tmp_path, max_train_steps=6, lr_scheduler="linear",
                               lr_warmup_steps=2))
    assert result.plot_path == str(tmp_path / "tiny-loss.png")
    with Image.open(result.plot_path) as im:
        assert im.format == "PNG" and im.size == (1000, 560)
        colors = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
    assert (25, 70, 160) in colors, "the average-loss line"
    assert (230, 120, 20) in colors, "the learning-rate line"


def test_loss_plot_function_handles_gaps_and_flat_values(tmp_path):
    from PIL import Image

    from sd_scripts.training.loss_plot import moving_average, save_loss_plot

    assert moving_average([1.0, float("nan"), 3.0, 5.0], 2) == [1.0, 1.0, 2.0, 4.0]
    path = save_loss_plot(tmp_path / "a.png", [0.5, float("nan"), 0.5, 0.5], [[1e-4]] * 4, ["unet"], "flat")
    with Image.open(path) as im:
        assert im.size == (1000, 560)
    save_loss_plot(tmp_path / "b.png", [], [], [], "empty")
    assert (tmp_path / "b.png").is_file()
