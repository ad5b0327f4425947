"""The training loop: ``train(config, callbacks) -> TrainResult``.

Reads top to bottom: preflight, accelerator, models, dataset (and latent cache), network,
optimizer and schedule, the state to resume from, then one loop over epochs and batches.
Family-specific work (text encoding, the UNet call, latent scale) goes through the model family
object, so the loop never branches on a family name. Progress, samples and saves reach the caller
through callbacks; nothing here prints.

Reliability rules the loop keeps:

* **Exact resume.** ``save_state`` writes the network, optimizer, scheduler, random states, the
  counters and the position in the data order (:mod:`.state`). The data order depends only
  on (seed, epoch, batch index), so a resumed run skips the batches already trained on and
  continues bit for bit: a run stopped after a saved state and resumed ends with the same LoRA.
  The data loader has its own random generator, so starting an epoch draws nothing from torch's
  global generator, and sampling saves and restores every random state.
* **Several processes.** Every process is seeded with the run's seed while models, latents and
  network are built (same weights everywhere), and agrees on the data order; when training
  starts, each process but 0 switches to its own stream (``state.process_seed``), so the
  GPUs draw different noise, timesteps and dropout. Process 0 keeps the single-process stream.
  States hold every process's random states.
* **Ctrl+C.** The first Ctrl+C finishes the current step (or abandons the sample image being
  drawn), saves ``<output_name>-interrupted.<ext>`` and, with ``save_state``, the state, then
  raises :class:`TrainingInterrupted` (a ``KeyboardInterrupt``: command lines exit with 130).
  A second Ctrl+C stops at once.
* **NaN/inf.** A non-finite loss (or gradient norm) stops the run with the step and the batch's
  image files named -- or, with ``skip_nonfinite_steps``, skips that optimizer step. Weights are
  checked before every save; nothing non-finite is ever written.
* **Disk full.** A save that fails for lack of space keeps the previous files and stops with one
  line saying what could not be written, how much space it needed, and which state to resume from.
"""

from __future__ import annotations

from typing import Any

from sd_scripts.training.callbacks import CallbackDispatcher
from sd_scripts.training.epoch import EpochLoop, StopRequest
from sd_scripts.training.results import (TrainingInterrupted, TrainingStopped, TrainResult, lora_file_name,
                                         loss_plot_name)
from sd_scripts.training.resume import Resuming
from sd_scripts.training.saving import Saving
from sd_scripts.training.setup import SetupSteps
from sd_scripts.training.step import TrainStep
from sd_scripts.training.validation_run import Validating

__all__ = ["TrainResult", "TrainingStopped", "TrainingInterrupted", "train", "lora_file_name", "loss_plot_name"]


def train(config, callbacks: Any = None, *, model: Any = None, plan: Any = None) -> TrainResult:
    """Train a LoRA as ``config`` says; raise UserError subclasses for user mistakes.

    ``model`` (a ``LoadedModel``) skips loading ``pretrained_model_name_or_path``; benchmarks use it
    to train a model built in memory. ``plan`` is the result of ``preflight(config)`` when the caller
    already ran it (so the dataset is not scanned twice). Ctrl+C raises :class:`TrainingInterrupted`
    after saving.
    """
    from sd_scripts.training.preflight import preflight

    cb = CallbackDispatcher(callbacks)
    if plan is None:
        plan = preflight(config, model_given=model is not None)
    for w in plan.warnings:
        cb.on_message(f"warning: {w}")
    return _Trainer(config, plan, cb, model).run()


class _Trainer(SetupSteps, Resuming, TrainStep, EpochLoop, Saving, Validating):
    """One training run: :meth:`run` is the whole of it, top to bottom. The parts it is made of, one file each, and
    the state they share: :mod:`sd_scripts.training.trainer_base`."""

    def __init__(self, config, plan, cb, model=None):
        self.config = config
        self.plan = plan
        self.cb = cb
        self.preloaded_model = model
        self._prompt_cache: dict = {}
        self.result = TrainResult(output_path=None, warnings=list(plan.warnings))
        self._stop = StopRequest()
        self._trackers_on = False
        self._last_lora: str | None = None
        self._last_state: str | None = None
        self._last_state_step: int | None = None
        self._last_sample_step = -1
        self._at_boundary = True  # weights, optimizer and counters agree (between optimizer steps)
        self._consistent = True  # weights are not half-updated

    def run(self) -> TrainResult:
        self._start_accelerator()  # seed, mixed precision, logs folder
        self._load_base_model()  # frozen, base_weights merged, noise schedule
        self._build_datasets()  # latents cached, validation images held out
        built_network = self._build_network()
        self._place_text_encoders()  # devices and precisions (fp8_base)
        self._cache_text_encoder_outputs()  # then the text encoders leave the GPU
        self._place_denoiser()  # the family's placement: fp8_base, blocks_to_swap
        self._set_training_modes()  # gradient checkpointing
        self._apply_speed_options()  # channels_last, torch_compile (regional)
        self._build_optimizer()
        self._build_schedule_and_loader()
        self._prepare_outputs(built_network)  # metadata, sample prompts, loggers
        self._choose_start()  # fresh, resume or initial_step
        self._announce_start()
        self.memory.mark("cache")  # latents and text conditioning cached, network and optimizer built
        self._train_until_done()  # epochs, saves, samples, validation; Ctrl+C
        self.memory.mark("train")
        self.cb.on_message(self.memory.summary())
        self.cb.on_end(self.result)
        return self.result
