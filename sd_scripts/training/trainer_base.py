"""The state the training loop's parts share, declared in one place.

:class:`sd_scripts.training.loop._Trainer` is put together from one class per job, each in a file named for it:
:mod:`.setup` (the setup steps), :mod:`.resume` (where the run starts), :mod:`.step` (one batch's loss),
:mod:`.epoch` (the loop over epochs, Ctrl+C), :mod:`.saving` (LoRA files, states, pruning, the plot) and
:mod:`.validation_run` (the held-out loss). They all derive from :class:`TrainerBase`, which lists every attribute
they share (set by the setup steps, in the order they run) and the few helpers all of them call.
"""

from __future__ import annotations

from typing import Any

from sd_scripts.networks.trainable import TrainableNetwork
from sd_scripts.training.callbacks import CallbackDispatcher
from sd_scripts.training.results import TrainResult

__all__ = ["TrainerBase"]


class TrainerBase:
    # given by the caller
    config: Any  # TrainConfig
    plan: Any  # preflight's Plan
    cb: CallbackDispatcher
    preloaded_model: Any
    result: TrainResult
    # setup.SetupSteps._start_accelerator
    seed: int
    run_stamp: str
    accelerator: Any
    weight_dtype: Any
    vae_dtype: Any
    memory: Any  # speed.PhaseMemory: peak memory at the end of load, cache and train
    # setup.SetupSteps._load_base_model
    model: Any  # LoadedModel
    family: Any  # ModelFamily
    v_param: bool
    objective: Any  # objectives.DDPMObjective | FlowMatchingObjective: noising, target, loss weights
    alphas_cumprod: Any  # the DDPM schedule, or None
    # setup.SetupSteps._build_datasets (validation_run.Validating._prepare_validation)
    dataset: Any  # TrainDataset
    val_dataset: Any  # TrainDataset of the held-out images, or None
    validation_seed: int
    # setup.SetupSteps._build_network / _place_text_encoders / _cache_text_encoder_outputs / _place_denoiser
    network: TrainableNetwork
    train_te: bool
    full_half: bool
    te_dtype: Any
    denoiser_placement: Any  # what the family's place_denoiser keeps alive (FLUX.1's block swap), or None
    _prompt_cache: dict
    _te_cache_complete: bool
    # setup.SetupSteps._build_optimizer / _build_schedule_and_loader
    group_names: list[str]
    optimizer: Any
    optimizer_name: str
    schedule_free: bool
    trainable_params: list
    max_train_steps: int
    loader_view: Any  # data_loader.StepAwareDataset
    dataloader: Any
    lr_scheduler: Any
    steps_per_epoch: int
    num_train_epochs: int
    save_every_n_epochs: int | None
    # setup.SetupSteps._prepare_outputs
    metadata: dict[str, str]
    sample_prompts: list
    _trackers_on: bool
    # resume.Resuming._choose_start
    progress: Any  # state.TrainProgress
    resumed_rng: Any
    # epoch.EpochLoop
    grad_buffer: Any  # grad_buffer.GradBuffer on a one-process CPU run, or None
    _recent: Any  # deque of the last epoch's worth of finite losses
    _at_boundary: bool  # weights, optimizer and counters agree (between optimizer steps)
    _consistent: bool  # weights are not half-updated
    _last_sample_step: int
    # saving.Saving
    _last_lora: str | None
    _last_state: str | None
    _last_state_step: int | None

    def _warn(self, text: str) -> None:
        self.result.warnings.append(text)
        self.cb.on_message(f"warning: {text}")

    def _any_process(self, flag: bool) -> bool:
        """``flag`` on any process (all processes must call this together)."""
        if self.accelerator.num_processes == 1:
            return flag
        import torch

        t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def _log(self, values: dict, step: int) -> None:
        if self._trackers_on:
            self.accelerator.log(values, step=step)
