"""Where a run starts: at step 0, from a saved state (``resume``), or at kohya's ``initial_step`` /
``initial_epoch`` without a state."""

from __future__ import annotations

import math

from sd_scripts.core.errors import ConfigError
from sd_scripts.training.trainer_base import TrainerBase

__all__ = ["Resuming"]


class Resuming(TrainerBase):
    def _choose_start(self) -> None:
        """The run's counters and history: fresh, or the saved state, or the initial step."""
        from sd_scripts.training.state import TrainProgress, load_train_state

        config = self.config
        self.progress = TrainProgress(num_batches_per_epoch=len(self.dataloader), max_train_steps=self.max_train_steps,
                                      seed=self.seed, group_names=list(self.group_names))
        self.resumed_rng = None
        if config.resume:
            self._restore(load_train_state(config.resume))
        elif config.initial_step is not None or config.initial_epoch is not None:
            self._start_at_initial_step()

    def _restore(self, state) -> None:
        """Put the saved network, optimizer, scheduler, counters and history in place."""
        from sd_scripts.training.state import saved_rng_of

        p = state.progress
        self._check_state_network(state)
        self.network.load_state_dict(state.network)
        try:
            if state.optimizer is not None:
                self.optimizer.load_state_dict(state.optimizer)
            if state.scheduler is not None:
                self.lr_scheduler.load_state_dict(state.scheduler)
        except (ValueError, KeyError, RuntimeError) as e:
            raise ConfigError(f"resume: the optimizer state in {state.path} does not fit ({' '.join(str(e).split())[:160]}); "
                              "resume with the optimizer settings of the run that saved it", "resume") from None
        if state.scaler is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state.scaler)
        if p.num_batches_per_epoch != len(self.dataloader):
            self._warn(f"resume: the state had {p.num_batches_per_epoch} batches per epoch, now {len(self.dataloader)} "
                       "(the dataset or batch settings changed); training continues from the saved step, but not "
                       "exactly as an uninterrupted run would")
            if p.batches_done > len(self.dataloader):
                p.batches_done = len(self.dataloader)
        if p.global_step >= self.max_train_steps:
            self._warn(f"resume: the state is at step {p.global_step}, the run has {self.max_train_steps} steps; "
                       "nothing is left to train (raise max_train_steps or max_train_epochs to continue)")
        self.progress.global_step, self.progress.epoch = p.global_step, p.epoch
        self.progress.batches_done, self.progress.epoch_end_done = p.batches_done, p.epoch_end_done
        self.progress.epoch_start_step = p.epoch_start_step
        self.progress.losses, self.progress.lrs = list(p.losses), list(p.lrs)
        self.progress.validations = list(p.validations)
        self.result.validation_losses = list(p.validations)
        self.result.losses = [v for v in p.losses if math.isfinite(v)]
        self.resumed_rng = saved_rng_of(state.rng, self.accelerator.process_index)
        self.result.resumed_from = state.path
        self._last_state, self._last_state_step = state.path, p.global_step
        self.cb.on_message(f"resuming from {state.path}: step {p.global_step}, epoch {p.epoch}")

    def _check_state_network(self, state) -> None:
        """The saved network has this run's tensors (names and shapes), or a one-line error."""
        own = self.network.state_dict()
        missing = sorted(set(own) - set(state.network))
        unexpected = sorted(set(state.network) - set(own))
        wrong = [k for k in own if k in state.network and tuple(own[k].shape) != tuple(state.network[k].shape)]
        if missing or unexpected or wrong:
            example = (missing or unexpected or wrong)[0]
            raise ConfigError(f"resume: the network in {state.path} does not match these settings ({example}); resume "
                              "with the network settings of the run that saved it", "resume")

    def _start_at_initial_step(self) -> None:
        """kohya's ``initial_step`` / ``initial_epoch`` without a saved state: the step and epoch counters (so file
        names, logs and saves) and the learning-rate schedule start there; the run trains the steps left up to
        max_train_steps. By default the epoch begins at its first batch (kohya advances only the epoch number);
        ``skip_until_initial_step`` skips the batches the earlier run trained on in that epoch (the data order
        depends only on the seed and the epoch). Unlike kohya, the schedule starts at the step, not at 0."""
        import warnings

        config, p = self.config, self.progress
        per_epoch = self.steps_per_epoch
        if config.initial_step is not None:
            step, setting = int(config.initial_step), "initial_step"
        else:
            step, setting = (int(config.initial_epoch) - 1) * per_epoch, "initial_epoch"
        if step <= 0:
            return
        if step >= self.max_train_steps:
            raise ConfigError(f"{setting}: starts at step {step}, but the run has {self.max_train_steps} steps; raise "
                              "max_train_steps or max_train_epochs, or start earlier", setting)
        done_epochs = step // per_epoch
        p.global_step, p.epoch = step, done_epochs + 1
        if config.skip_until_initial_step:
            p.batches_done = (step - done_epochs * per_epoch) * self.config.gradient_accumulation_steps
            p.epoch_start_step = done_epochs * per_epoch
        else:
            p.batches_done, p.epoch_start_step = 0, step
        # the history holds one (empty) row per step before the start, so it stays indexed by step
        p.losses = [float("nan")] * step
        p.lrs = [[float("nan")] * len(self.group_names) for _ in range(step)]
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose here
            warnings.simplefilter("ignore")
            for _ in range(step * self.accelerator.num_processes):  # accelerate steps it once per process
                scheduler.step()
        skipped = f", skipping {p.batches_done} batches of it" if p.batches_done else ""
        self.cb.on_message(f"{setting}: starting at step {step}, epoch {p.epoch}{skipped}")
