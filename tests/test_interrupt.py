"""Reliability inside the training loop: Ctrl+C, NaN/inf, disk full while saving, and kills at random moments."""

from __future__ import annotations

import errno
import multiprocessing
import os
import random
import signal
import sys
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import make_dataset, tiny_config

pytestmark = pytest.mark.slow

BASE = dict(max_train_steps=6, lr_scheduler="cosine", lr_warmup_steps=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("interrupt") / "data", folder="1_sks shape", count=4)


@pytest.fixture(scope="module")
def reference(tiny_sd1_diffusers, data, tmp_path_factory) -> dict:
    """The LoRA of an uninterrupted 6-step run."""
    from sd_scripts.training.loop import train

    result = train(tiny_config(tiny_sd1_diffusers, data, tmp_path_factory.mktemp("ref"), **BASE))
    return load_file(result.output_path)


def _same(expected: dict, path: str) -> None:
    got = load_file(path)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), f"{k} differs"


def _train(model, data, out, callbacks=None, **overrides):
    from sd_scripts.training.loop import train

    return train(tiny_config(model, data, out, **{**BASE, **overrides}), callbacks)


class _CtrlC:
    """Press Ctrl+C (SIGINT to this process) ``times`` times when step ``step`` is done."""

    def __init__(self, step: int, times: int = 1):
        self.step, self.times = step, times
        self.messages: list[str] = []

    def on_progress(self, step, total, loss, lr, epoch):
        if step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)

    def on_message(self, text):
        self.messages.append(text)


# ------------------------------------------------------------------------------------------- Ctrl+C


def test_ctrl_c_saves_interrupted_lora_and_state_then_resumes(tiny_sd1_diffusers, data, reference, tmp_path):
    from sd_scripts.training.loop import TrainingInterrupted

    cb = _CtrlC(3)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a shell's background job
    with pytest.raises(TrainingInterrupted) as err:
        _train(tiny_sd1_diffusers, data, tmp_path, cb, save_state=True)
    assert isinstance(err.value, KeyboardInterrupt)
    lora = tmp_path / "tiny-interrupted.safetensors"
    state = tmp_path / "tiny-step00000003-state"
    assert err.value.saved_files == [str(lora)] and err.value.state_path == str(state)
    assert lora.is_file() and state.is_dir() and (tmp_path / "tiny-loss.png").is_file()
    assert not (tmp_path / "tiny.safetensors").exists()
    assert any("interrupted at step 3" in m and "resume=" in m for m in cb.messages)
    assert signal.getsignal(signal.SIGINT) is before, "the handler must be put back"
    resumed = _train(tiny_sd1_diffusers, data, tmp_path / "resumed", resume=str(state))
    _same(reference, resumed.output_path)


def test_ctrl_c_without_save_state_saves_the_lora(tiny_sd1_diffusers, data, tmp_path):
    from sd_scripts.training.loop import TrainingInterrupted

    with pytest.raises(TrainingInterrupted) as err:
        _train(tiny_sd1_diffusers, data, tmp_path, _CtrlC(2))
    assert err.value.state_path is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-interrupted.safetensors", "tiny-loss.png"]
    sd = load_file(str(tmp_path / "tiny-interrupted.safetensors"))
    assert all(torch.isfinite(v).all() for v in sd.values())


def test_second_ctrl_c_stops_at_once(tiny_sd1_diffusers, data, tmp_path):
    from sd_scripts.training.loop import TrainingInterrupted

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as err:
        _train(tiny_sd1_diffusers, data, tmp_path, _CtrlC(2, times=2), save_state=True)
    assert not isinstance(err.value, TrainingInterrupted)
    assert not (tmp_path / "tiny-interrupted.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_during_sampling_abandons_the_image(tiny_sd1_diffusers, data, tmp_path):
    from sd_scripts.training.loop import TrainingInterrupted

    prompts = tmp_path / "p.txt"
    prompts.write_text("sks shape --w 64 --h 64 --s 50\nsks shape, red --w 64 --h 64 --s 50\n", encoding="utf-8")

    class PressDuringSampling:
        def on_sample(self, paths):
            pass

    import sd_scripts.training.sampling as sampling

    original = sampling.make_sampler

    def make_sampler(name, v):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl+C while the first sample image is being drawn
        return original(name, v)

    try:
        sampling.make_sampler = make_sampler
        with pytest.raises(TrainingInterrupted):
            _train(tiny_sd1_diffusers, data, tmp_path / "out", PressDuringSampling(), sample_prompts=str(prompts),
                   sample_every_n_steps=2, save_state=True)
    finally:
        sampling.make_sampler = original
    out = tmp_path / "out"
    assert (out / "tiny-interrupted.safetensors").is_file() and (out / "tiny-step00000002-state").is_dir()
    assert not list((out / "sample").glob("*.png")), "the abandoned sample must not be written"


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds the loader workers through /proc")
def test_ctrl_c_reaches_loader_workers_too(tiny_sd1_diffusers, data, reference, tmp_path):
    """A terminal's Ctrl+C goes to the data loader workers as well: they leave it to the main process (forked
    workers inherit its handler; spawned ones, as on Windows, ignore SIGINT through worker_init_fn)."""
    from sd_scripts.training.loop import TrainingInterrupted

    class CtrlCEverywhere:
        def on_progress(self, step, total, loss, lr, epoch):
            if step == 2:  # the workers get it first: they must keep serving batches
                children = []
                for task in os.listdir("/proc/self/task"):
                    with open(f"/proc/self/task/{task}/children") as f:
                        children += [int(pid) for pid in f.read().split()]
                assert children, "the loader worker should be running"
                for pid in children:
                    os.kill(pid, signal.SIGINT)
            if step == 4:
                os.kill(os.getpid(), signal.SIGINT)

    workers = dict(max_data_loader_n_workers=1, persistent_data_loader_workers=True)
    with pytest.raises(TrainingInterrupted) as err:
        _train(tiny_sd1_diffusers, data, tmp_path, CtrlCEverywhere(), save_state=True, **workers)
    resumed = _train(tiny_sd1_diffusers, data, tmp_path / "resumed", resume=err.value.state_path, **workers)
    _same(reference, resumed.output_path)


def test_cli_exits_130_on_ctrl_c(tiny_sd1_diffusers, data, tmp_path, capsys):
    from sd_scripts.cli_common import run_cli

    def main():
        _train(tiny_sd1_diffusers, data, tmp_path, _CtrlC(1))
        return 0

    assert run_cli(main) == 130
    assert "interrupted" in capsys.readouterr().err
    assert (tmp_path / "tiny-interrupted.safetensors").is_file()


# ------------------------------------------------------------------------------------------- NaN


def _poison_loss_at(monkeypatch, call: int):
    from sd_scripts.training import loop as train_loop

    original = train_loop._Trainer._step_loss
    count = {"n": 0}

    def step_loss(self, batch):
        count["n"] += 1
        loss = original(self, batch)
        return loss * float("nan") if count["n"] == call else loss

    monkeypatch.setattr(train_loop._Trainer, "_step_loss", step_loss)


def test_nan_loss_stops_naming_step_and_images(tiny_sd1_diffusers, data, tmp_path, monkeypatch):
    from sd_scripts.training.loop import TrainingStopped

    _poison_loss_at(monkeypatch, 3)
    with pytest.raises(TrainingStopped) as err:
        _train(tiny_sd1_diffusers, data, tmp_path, save_every_n_steps=1)
    text = str(err.value)
    assert "loss became nan at step 3" in text and ".png" in text and "skip_nonfinite_steps" in text
    assert "tiny-step00000002.safetensors" in text and "\n" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-step00000001.safetensors", "tiny-step00000002.safetensors"]


def test_nan_loss_skipped_when_asked(tiny_sd1_diffusers, data, tmp_path, monkeypatch):
    _poison_loss_at(monkeypatch, 3)
    result = _train(tiny_sd1_diffusers, data, tmp_path, skip_nonfinite_steps=True, logging_dir=str(tmp_path / "logs"))
    assert result.skipped_steps == [3] and result.global_step == 6
    assert any("step 3" in w and "skipped" in w for w in result.warnings)
    assert len(result.losses) == 5 and all(torch.isfinite(torch.tensor(result.losses)))
    sd = load_file(result.output_path)
    assert all(torch.isfinite(v).all() for v in sd.values())


def test_nan_weights_are_never_saved(tiny_sd1_diffusers, data, tmp_path, monkeypatch):
    from sd_scripts.training import loop as train_loop
    from sd_scripts.training.loop import TrainingStopped

    original = train_loop._Trainer._save_checkpoint

    def save_checkpoint(self, *, step=None, epoch=None):
        if step == 3:
            with torch.no_grad():
                next(iter(self.network.parameters())).view(-1)[0] = float("inf")
        return original(self, step=step, epoch=epoch)

    monkeypatch.setattr(train_loop._Trainer, "_save_checkpoint", save_checkpoint)
    with pytest.raises(TrainingStopped) as err:
        _train(tiny_sd1_diffusers, data, tmp_path, save_every_n_steps=1, save_state=True)
    assert "NaN/inf" in str(err.value) and "tiny-step00000002.safetensors" in str(err.value)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "tiny-step00000003.safetensors" not in names and "tiny-step00000003-state" not in names
    assert "tiny-step00000002.safetensors" in names and "tiny-step00000002-state" in names


# ------------------------------------------------------------------------------------------- disk full


@pytest.mark.parametrize("failing", ["lora", "state"])
def test_disk_full_keeps_previous_files_and_stays_resumable(tiny_sd1_diffusers, data, reference, tmp_path, monkeypatch,
                                                            failing):
    from sd_scripts.training.state import DiskFullError, load_train_state

    full = {"on": False}
    real_fsync = os.fsync

    def fsync(fd):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    class FillDisk:
        def on_progress(self, step, total, loss, lr, epoch):
            if step == 4 and failing == "lora":
                full["on"] = True

        def on_save(self, path):
            if path.endswith("tiny-step00000004.safetensors") and failing == "state":
                full["on"] = True

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    with pytest.raises(DiskFullError) as err:
        _train(tiny_sd1_diffusers, data, out, FillDisk(), save_every_n_steps=1, save_state=True)
    full["on"] = False
    text = str(err.value)
    what = "LoRA file" if failing == "lora" else "training state"
    target = "tiny-step00000004.safetensors" if failing == "lora" else "tiny-step00000004-state"
    assert f"could not write the {what}" in text and target in text and "needs about" in text and "MB" in text
    assert f"resume from {out / 'tiny-step00000003-state'}" in text and "\n" not in text
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")], "no temporary file may stay behind"
    assert "tiny-step00000004-state" not in names
    assert ("tiny-step00000004.safetensors" in names) == (failing == "state")
    assert load_file(str(out / "tiny-step00000003.safetensors"))
    assert load_train_state(out / "tiny-step00000003-state").progress.global_step == 3
    resumed = _train(tiny_sd1_diffusers, data, tmp_path / "resumed", resume=str(out / "tiny-step00000003-state"))
    _same(reference, resumed.output_path)


def test_disk_full_message_reaches_the_cli_as_exit_2(tiny_sd1_diffusers, data, tmp_path, monkeypatch, capsys):
    from sd_scripts.cli_common import run_cli

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    assert run_cli(lambda: _train(tiny_sd1_diffusers, data, tmp_path, max_train_steps=1)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: disk full: could not write the LoRA file")
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------- kills


KILL_RUN = dict(BASE, save_state=True, save_every_n_steps=1, save_last_n_steps_state=3)


def _child(model, data, out, resume, how, n):
    """Runs in a forked process: train (resuming if a state exists) and get SIGKILLed somewhere."""
    try:
        if how in ("replace", "fsync"):  # kill just before the n-th rename / in the n-th flush of a save
            real = getattr(os, how)
            calls = {"n": 0}

            def hook(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == n:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*args, **kwargs)

            setattr(os, how, hook)
        from sd_scripts.training.loop import train

        train(tiny_config(model, data, out, resume=resume, **KILL_RUN))
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def _check_outputs(out: Path) -> None:
    """Every file a user can see loads: LoRAs with safetensors, states with the resume reader."""
    from sd_scripts.training.state import load_train_state

    for p in out.iterdir():
        if p.name.startswith("."):
            continue  # unfinished temporary files of a killed save; the next run removes them
        if p.suffix == ".safetensors":
            sd = load_file(str(p))
            assert sd and all(torch.isfinite(v).all() for v in sd.values()), p
        elif p.name.endswith("-state"):
            load_train_state(p)
        elif p.suffix == ".png":
            from PIL import Image

            Image.open(p).verify()


def test_killed_twenty_times_then_resumed_gives_the_same_lora(tiny_sd1_diffusers, data, reference, tmp_path):
    from sd_scripts.training.state import find_latest_state

    ctx = multiprocessing.get_context("fork")
    rng = random.Random(20240607)
    out = tmp_path / "out"
    kills = completed = 0
    kinds: dict[str, int] = {}
    while kills < 20:
        resume = find_latest_state(out, "tiny") if out.exists() else None
        how = rng.choice(["timer", "replace", "fsync"])
        n = rng.randint(1, 24)
        child = ctx.Process(target=_child, args=(tiny_sd1_diffusers, data, out, resume, how, n))
        child.start()
        if how == "timer":
            child.join(rng.uniform(0.3, 2.5))
            if child.is_alive():
                os.kill(child.pid, signal.SIGKILL)
        child.join(120)
        assert child.exitcode in (0, -signal.SIGKILL), f"the training failed (exit {child.exitcode})"
        if child.exitcode == 0:  # it finished before the kill: its LoRA must be the reference, then start over
            _same(reference, str(out / "tiny.safetensors"))
            completed += 1
            import shutil

            shutil.rmtree(out)
            continue
        kills += 1
        kinds[how] = kinds.get(how, 0) + 1
        if out.exists():
            _check_outputs(out)
    # finish from the latest state without kills
    from sd_scripts.training.loop import train

    result = train(tiny_config(tiny_sd1_diffusers, data, out, resume=find_latest_state(out, "tiny"), **KILL_RUN))
    _same(reference, result.output_path)
    _check_outputs(out)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "leftovers of killed saves are cleaned up"
    print("kills", kinds, "completed", completed)
    assert len(kinds) == 3, kinds
