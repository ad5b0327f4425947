"""Training states for exact resume: what ``save_state`` writes and ``resume`` reads.

A state is a folder named as kohya names them -- ``<output_name>-<epoch:06d>-state`` (per epoch),
``<output_name>-step<step:08d>-state`` (per step, and on Ctrl+C) and ``<output_name>-state`` (end
of training) -- holding:

``train_state.json``
    format/version, the step and epoch counters, the position in the data order (``epoch`` and
    ``batches_done`` in it; the order itself follows from the seed), the seed, and the settings
    that must match to continue (network and optimizer). kohya's ``current_epoch`` /
    ``current_step`` keys are there too.
``network.safetensors``
    the network's own ``state_dict()`` in full precision (not the saved LoRA, which may be fp16).
``training.pt``
    optimizer, lr scheduler, gradient scaler, random-number states of every process (python,
    numpy, torch CPU and CUDA) and the loss / learning-rate history (for logs and the plot). Read
    with ``torch.load(weights_only=True)``: no code in it runs.

The folder is written under a hidden temporary name in the same place and renamed when complete,
so a crash or kill never leaves a half-written state under a final name. Replacing an existing
state moves the old one aside first; :func:`recover_output_folder` puts it back if a kill fell
between the two renames and removes temporary files of killed runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import ConfigError, UserError
from sd_scripts.core.problems import Problems

__all__ = [
    "STATE_FILE", "TrainProgress", "LoadedState", "DiskFullError", "state_dir_name", "save_train_state",
    "load_train_state", "read_progress", "find_latest_state", "check_resume_settings", "recover_output_folder",
    "capture_rng", "restore_rng", "process_seed", "saved_rng_of", "is_disk_full", "disk_full_error", "folder_bytes",
    "MATCHING_SETTINGS",
]

STATE_FILE = "train_state.json"
NETWORK_FILE = "network.safetensors"
TRAINING_FILE = "training.pt"
FORMAT = "lets-train-state"
VERSION = 1

# Settings that must be the same to continue a state: they shape the network and the optimizer state.
MATCHING_SETTINGS = ("network_module", "network_dim", "network_args", "network_train_unet_only",
                     "network_train_text_encoder_only", "optimizer_type")


class DiskFullError(UserError):
    """A file could not be written because the disk (or quota) is full; nothing was replaced."""


def state_dir_name(output_name: str | None, *, epoch: int | None = None, step: int | None = None) -> str:
    """kohya's state folder names: ``name-000001-state``, ``name-step00000500-state``, ``name-state``."""
    name = output_name or "last"
    if epoch is not None:
        return f"{name}-{epoch:06d}-state"
    if step is not None:
        return f"{name}-step{step:08d}-state"
    return f"{name}-state"


@dataclass
class TrainProgress:
    """Where a run stands: counters, data position and history."""

    global_step: int = 0
    epoch: int = 1  # the epoch the position is in (1-based)
    batches_done: int = 0  # batches of ``epoch`` already trained on (per process)
    epoch_end_done: bool = False  # the end-of-epoch saves/samples of ``epoch`` have run
    epoch_start_step: int = 0  # global step when ``epoch`` began (for the epoch's average loss)
    num_batches_per_epoch: int = 0
    max_train_steps: int = 0
    seed: int = 0
    losses: list[float] = field(default_factory=list)  # one per step; NaN for a skipped step
    lrs: list[list[float]] = field(default_factory=list)  # one row per step, one value per group
    group_names: list[str] = field(default_factory=list)
    validations: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss), for the loss plot


@dataclass
class LoadedState:
    path: str
    progress: TrainProgress
    info: dict[str, Any]
    network: dict[str, Any]
    optimizer: dict | None
    scheduler: dict | None
    scaler: dict | None
    rng: list[dict]


# ----------------------------------------------------------------------------- random states


def capture_rng() -> dict[str, Any]:
    """The random states of this process (python, numpy, torch CPU, CUDA when in use)."""
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # another GPU count: the first device's state at least
            torch.cuda.set_rng_state(cuda[0])


def process_seed(seed: int, process_index: int, step: int = 0) -> int:
    """The seed of process ``process_index``'s own random stream, started at optimizer step ``step``.

    With several processes (``accelerate launch``), every process is seeded with the run's seed
    while the models and the network are built, so they start from the same weights; when
    training starts, each process other than 0 switches to this stream, so that it draws its own
    noise, timesteps and dropout (kohya gets the same effect from ``set_seed(seed,
    device_specific=True)``). Process 0 keeps the run's stream, which is what a single process
    draws. The value is a 32-bit hash of the three numbers (numpy seeds are 32-bit): the same
    inputs always start the same stream.
    """
    return random.Random(f"lets-process/{seed}/{process_index}/{step}").getrandbits(32)


def saved_rng_of(rng_states: list[dict], process_index: int) -> dict | None:
    """The random states a state folder holds for process ``process_index``, or None: the process then
    starts its stream from :func:`process_seed`. None too for a process other than 0 whose saved
    states equal process 0's (saved by a version whose processes all drew the same numbers)."""
    import torch

    if process_index >= len(rng_states):
        return None
    mine = rng_states[process_index]
    if process_index > 0 and torch.equal(mine["torch"], rng_states[0]["torch"]):
        return None
    return mine


# ----------------------------------------------------------------------------- disk full


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def disk_full_error(what: str, path: str | os.PathLike, needed: int, resume_hint: str | None = None) -> DiskFullError:
    """The one-line message for a write that failed because the disk is full."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    try:
        free = shutil.disk_usage(folder).free
        free_text = f", {_mb(free)} free"
    except OSError:
        free_text = ""
    text = (f"disk full: could not write the {what} {path} (needs about {_mb(needed)}{free_text}); "
            f"the previous files are kept; free some space")
    text += f" and resume from {resume_hint}" if resume_hint else " and train again"
    return DiskFullError(text, "output_dir")


def folder_bytes(path: str | os.PathLike) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(dirpath, f))
    return total


# ----------------------------------------------------------------------------- save


def _settings_of(config: TrainConfig) -> dict[str, Any]:
    out = {}
    for name in MATCHING_SETTINGS:
        value = getattr(config, name)  # a setting named in MATCHING_SETTINGS
        if name == "network_dim":
            value = value or 4
        if name == "network_args":
            value = [str(v) for v in (value or [])]
        if name == "optimizer_type":
            value = str(value or "AdamW").lower()
        out[name] = value
    return out


def save_train_state(folder: str | os.PathLike, *, network_state: dict, optimizer_state: dict | None,
                     scheduler_state: dict | None, scaler_state: dict | None, rng_states: list[dict],
                     progress: TrainProgress, config) -> str:
    """Write a complete state folder atomically (temporary folder, then rename); return its path.

    Raises OSError as the file system does (ENOSPC when the disk is full); an existing state
    under the same name is kept in that case.
    """
    import torch
    from safetensors.torch import save as st_save

    from sd_scripts.files.atomic import fsync_dir, atomic_save_bytes, atomic_save_text, atomic_write

    final = Path(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(4)
    tmp = final.with_name(f".{final.name}.{tag}.tmp")
    tmp.mkdir()
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in network_state.items()}
        atomic_save_bytes(tmp / NETWORK_FILE, st_save(tensors, {"format": FORMAT}))
        training = {
            "optimizer": optimizer_state,
            "scheduler": scheduler_state,
            "scaler": scaler_state,
            "rng": rng_states,
            "losses": torch.tensor(progress.losses, dtype=torch.float64),
            "lrs": torch.tensor(progress.lrs, dtype=torch.float64) if progress.lrs else torch.zeros(0, 0, dtype=torch.float64),
            "validations": torch.tensor(progress.validations, dtype=torch.float64).reshape(-1, 2),
        }
        with atomic_write(tmp / TRAINING_FILE) as f:
            torch.save(training, f)
        info = {
            "format": FORMAT,
            "version": VERSION,
            "current_epoch": progress.epoch,
            "current_step": progress.global_step,
            "global_step": progress.global_step,
            "epoch": progress.epoch,
            "batches_done": progress.batches_done,
            "epoch_end_done": progress.epoch_end_done,
            "epoch_start_step": progress.epoch_start_step,
            "num_batches_per_epoch": progress.num_batches_per_epoch,
            "max_train_steps": progress.max_train_steps,
            "seed": progress.seed,
            "group_names": list(progress.group_names),
            "output_name": config.output_name,
            "settings": _settings_of(config),
            "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        atomic_save_text(tmp / STATE_FILE, json.dumps(info, indent=1))  # written last: marks the folder complete
        fsync_dir(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.{tag}.old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final)


# ----------------------------------------------------------------------------- read


def _read_info(path: Path) -> dict[str, Any]:
    """train_state.json of a state folder; ConfigError (setting ``resume``) when it is not one."""
    info_path = path / STATE_FILE
    if not info_path.is_file():
        if (path / "optimizer.bin").exists() or any(path.glob("random_states_*.pkl")):
            raise ConfigError(f"resume: {path} is an accelerate/kohya state, which cannot be continued exactly here; "
                              "give its LoRA file as network_weights to continue from its weights", "resume")
        raise ConfigError(f"resume: {path} is not a training state folder (it has no {STATE_FILE}); give a "
                          "folder that save_state wrote (named ...-state)", "resume")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"resume: {info_path} cannot be read ({e}); give another state folder", "resume") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ConfigError(f"resume: {info_path} is not a state written by this trainer; give another state folder", "resume")
    if int(info.get("version", 0)) > VERSION:
        raise ConfigError(f"resume: {path} was written by a newer version of this trainer (state version "
                          f"{info.get('version')}); update the trainer", "resume")
    for name in (NETWORK_FILE, TRAINING_FILE):
        if not (path / name).is_file():
            raise ConfigError(f"resume: {path} lacks {name}; give another state folder", "resume")
    return info


def read_progress(path: str | os.PathLike) -> dict[str, Any]:
    """The ``train_state.json`` of a state folder (cheap; raises ConfigError if it is not a state)."""
    return _read_info(Path(path))


def check_resume_settings(config: TrainConfig, problems: Problems | None = None) -> list[UserError]:
    """Preflight for ``resume``: the folder is a complete state and the network/optimizer settings match. Recorded
    in ``problems``, whose errors it returns."""
    problems = Problems() if problems is None else problems
    if config.resume:
        with problems.collecting():
            _check_resume_state(config, Path(config.resume), problems)
    return problems.errors


def _check_resume_state(config: TrainConfig, path: Path, problems: Problems) -> None:
    if not path.is_dir():
        problems.error("resume", f"state folder not found: {path}; give a folder saved with save_state")
        return
    info = _read_info(path)
    saved = info.get("settings") or {}
    now = _settings_of(config)
    if config.dim_from_weights:
        saved = {k: v for k, v in saved.items() if k != "network_dim"}
    diffs = [f"{k}={saved[k]!r} (now {now[k]!r})" for k in saved if k in now and saved[k] != now[k]]
    if diffs:
        problems.error("resume", f"the state was saved with {', '.join(diffs)}; resume with the network and "
                       "optimizer settings of the run that saved it")


def load_train_state(path: str | os.PathLike, device: str | None = None) -> LoadedState:
    """Read a state folder; ConfigError when it is not a complete state of this trainer."""
    import torch
    from safetensors.torch import load_file

    p = Path(path)
    info = _read_info(p)
    try:
        network = load_file(str(p / NETWORK_FILE), device=device or "cpu")
        training = torch.load(p / TRAINING_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file: say which, no traceback
        raise ConfigError(f"resume: {p} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                          "give another state folder", "resume") from None
    lrs = training.get("lrs")
    validations = training.get("validations")
    progress = TrainProgress(
        global_step=int(info["global_step"]), epoch=int(info["epoch"]), batches_done=int(info["batches_done"]),
        epoch_end_done=bool(info.get("epoch_end_done", False)), epoch_start_step=int(info.get("epoch_start_step", 0)),
        num_batches_per_epoch=int(info.get("num_batches_per_epoch", 0)), max_train_steps=int(info.get("max_train_steps", 0)),
        seed=int(info.get("seed", 0)), losses=[float(x) for x in training.get("losses", [])],
        lrs=lrs.tolist() if lrs is not None and lrs.numel() else [], group_names=list(info.get("group_names") or []),
        validations=[(int(step), float(v)) for step, v in validations.tolist()] if validations is not None else [],
    )
    return LoadedState(str(p), progress, info, network, training.get("optimizer"), training.get("scheduler"),
                       training.get("scaler"), list(training.get("rng") or []))


def find_latest_state(output_dir: str | os.PathLike, output_name: str | None = None) -> str | None:
    """The complete state folder in ``output_dir`` with the highest step (``output_name``'s only, if given)."""
    best: tuple[int, float, str] | None = None
    try:
        entries = list(os.scandir(output_dir))
    except OSError:
        return None
    for entry in entries:
        if not entry.is_dir() or entry.name.startswith(".") or not entry.name.endswith("-state"):
            continue
        if output_name and not entry.name.startswith(f"{output_name}-"):
            continue
        try:
            info = _read_info(Path(entry.path))
        except UserError:
            continue
        key = (int(info.get("global_step", 0)), entry.stat().st_mtime, entry.path)
        if best is None or key > best:
            best = key
    return best[2] if best else None


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.(?P<kind>tmp|old)$")


def recover_output_folder(output_dir: str | os.PathLike, output_name: str | None) -> list[str]:
    """Clean up after a killed run of ``output_name``: put back a state moved aside by an
    interrupted replace, and remove unfinished temporary files and folders. Returns what it did."""
    done: list[str] = []
    try:
        entries = sorted(os.scandir(output_dir), key=lambda e: e.name)
    except OSError:
        return done
    prefix = output_name or "last"
    for entry in entries:
        m = _LEFTOVER.match(entry.name)
        name = m.group("name") if m else ""
        if not (name == prefix or name.startswith((prefix + "-", prefix + "."))):
            continue
        target = os.path.join(output_dir, m.group("name"))
        with contextlib.suppress(OSError):
            if m.group("kind") == "old" and entry.is_dir() and not os.path.exists(target):
                os.replace(entry.path, target)
                done.append(f"restored {target}")
            elif entry.is_dir():
                shutil.rmtree(entry.path)
                done.append(f"removed {entry.path}")
            else:
                os.remove(entry.path)
                done.append(f"removed {entry.path}")
    return done
