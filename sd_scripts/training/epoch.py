"""The loop over epochs and batches: optimizer steps, their logs, what is due after a step or an epoch (validation,
checkpoints, sample images), the end of the run, and Ctrl+C.

A step reads top to bottom in :meth:`EpochLoop._run_epoch`: train the batch (:meth:`_train_batch`: loss, backward,
clip, optimizer step), and once the gradients are in sync count the optimizer step (:meth:`_count_step`), report it
(:meth:`_report_step`) and do what is due at it (:meth:`_after_step`).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from sd_scripts.training.results import (StopAtOnce, TrainingInterrupted, TrainingStopped, lora_file_name,
                                         state_name)
from sd_scripts.training.grad_buffer import GradBuffer
from sd_scripts.training.speed import clip_gradients
from sd_scripts.training.trainer_base import TrainerBase
from sd_scripts.training.validation import validation_due_at_epoch, validation_due_at_step

__all__ = ["EpochLoop", "StopRequest"]


class StopRequest:
    """SIGINT handling while training: the first Ctrl+C asks to stop, the second stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach only the main thread; a GUI thread stops through its own means
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        except (ValueError, OSError):  # pragma: no cover - no signal support here
            pass

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False

    def _handler(self, signum, frame):
        if self.requested:
            raise StopAtOnce("stopped at once (second Ctrl+C); nothing more was saved")
        self.requested = True


@dataclass
class _StepParts:
    """What the batches of one optimizer step gather until the step is counted."""

    t_last: float
    micro_losses: list = field(default_factory=list)
    images: int = 0
    skip_step: bool = False
    max_norm: tuple | None = None  # (keys scaled, mean norm, max norm) of the last scale_weight_norms pass


class EpochLoop(TrainerBase):
    _stop: StopRequest

    def _train_until_done(self) -> None:
        """The loop with Ctrl+C caught; the loggers are closed whatever happens."""
        self.grad_buffer = GradBuffer.for_run(self.accelerator, self.trainable_params)
        self._stop.install()
        try:
            self._loop()
        finally:
            self._stop.uninstall()
            if self.grad_buffer is not None:
                self.grad_buffer.release()
            if self._trackers_on:
                try:
                    self.accelerator.end_training()
                except Exception:  # noqa: BLE001 - closing logs must not hide the real outcome
                    pass

    def _loop(self):
        from accelerate.utils import set_seed

        from sd_scripts.training.state import process_seed, restore_rng

        config, p = self.config, self.progress
        try:
            if config.sample_at_first and not config.resume:
                self._sample(label=f"{0:06d}", step=0)
                self._check_stop()
            index = self.accelerator.process_index
            if self.resumed_rng is not None:
                restore_rng(self.resumed_rng)
            elif index > 0:
                # its own noise, timesteps and dropout; everything built so far came from the shared seed
                set_seed(process_seed(self.seed, index, p.global_step))
            epoch, skip = p.epoch, p.batches_done
            self._recent = deque((v for v in p.losses[-len(self.dataloader):] if math.isfinite(v)), maxlen=len(self.dataloader))
            if config.resume and skip >= len(self.dataloader):
                # the state was saved after the epoch's last batch
                if not p.epoch_end_done and not self._is_last_epoch(epoch):
                    self._end_epoch(epoch)
                epoch, skip = epoch + 1, 0
            while epoch <= self.num_train_epochs and p.global_step < self.max_train_steps:
                self._run_epoch(epoch, skip)
                skip = 0
                if self._is_last_epoch(epoch):
                    break
                self._end_epoch(epoch)
                epoch += 1
            self._finish()
        except KeyboardInterrupt as e:
            if isinstance(e, (TrainingInterrupted, StopAtOnce)):
                raise
            # an interrupt raised outside our handler (a callback, a non-main-thread caller): save what is safe
            self._interrupt()

    def _is_last_epoch(self, epoch: int) -> bool:
        return self.progress.global_step >= self.max_train_steps or epoch >= self.num_train_epochs

    # ----------------------------------------------------------------- one epoch
    def _run_epoch(self, epoch: int, skip: int) -> None:
        p = self.progress
        p.epoch = epoch
        if skip == 0:
            p.batches_done, p.epoch_start_step, p.epoch_end_done = 0, p.global_step, False
        batches = self._epoch_batches(epoch, skip)
        parts = _StepParts(t_last=time.perf_counter())
        for batch in batches:
            self._train_batch(batch, parts)
            if not self.accelerator.sync_gradients:
                continue
            # one optimizer step done (or skipped)
            step, value, lrs = self._count_step(parts)
            self._report_step(step, epoch, value, lrs, parts)
            self._after_step(step)
            parts.images, parts.t_last, parts.max_norm = 0, time.perf_counter(), None
            if step >= self.max_train_steps:
                break
        self.result.epochs = epoch

    def _epoch_batches(self, epoch: int, skip: int):
        """The epoch's batches, without the first ``skip`` (already trained on before a resume)."""
        p, accelerator = self.progress, self.accelerator
        self.loader_view.step_base = p.epoch_start_step
        self.dataloader.set_epoch(epoch)  # accelerate passes it on to the dataset (1-based)
        loader = self.dataloader
        if skip:
            loader = accelerator.skip_first_batches(self.dataloader, skip)
            loader.set_epoch(epoch)
            accelerator.step = 0  # states are saved between optimizer steps
        return loader

    def _train_batch(self, batch, parts: _StepParts) -> None:
        """Loss and backward pass of one batch; at the last batch of an optimizer step, clip and step (unless a
        non-finite value skips it)."""
        import torch

        accelerator = self.accelerator
        self._at_boundary = False
        self.progress.batches_done += 1
        parts.images += len(batch["captions"])
        with accelerator.accumulate(self.network):
            loss = self._step_loss(batch)
            if self._any_process(not bool(torch.isfinite(loss))):
                self._nonfinite(f"loss became {float(loss.detach())}", batch)
                parts.skip_step = True
            else:
                accelerator.backward(loss)
                parts.micro_losses.append(loss.detach())
            if accelerator.sync_gradients and not parts.skip_step:
                parts.skip_step = not self._sync_and_clip_gradients(batch)
            if not parts.skip_step:
                self._consistent = False
                self.optimizer.step()
                if self.config.scale_weight_norms and accelerator.sync_gradients:
                    parts.max_norm = self.network.apply_max_norm_regularization(self.config.scale_weight_norms,
                                                                                accelerator.device)
                self._consistent = True
            self.lr_scheduler.step()
            if self.grad_buffer is not None and accelerator.sync_gradients:
                self.grad_buffer.zero()
            else:
                self.optimizer.zero_grad(set_to_none=True)  # accelerate keeps them while accumulating

    def _sync_and_clip_gradients(self, batch) -> bool:
        """Average the gradients over the processes and clip them (max_grad_norm); False when their norm is not
        finite and the step is skipped."""
        import torch

        accelerator = self.accelerator
        if accelerator.num_processes > 1:
            for p in self.trainable_params:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
        if self.grad_buffer is not None:
            self.grad_buffer.settle()
        if self.config.max_grad_norm:
            if self.grad_buffer is not None:
                norm = self.grad_buffer.clip(self.config.max_grad_norm)
            else:
                norm = clip_gradients(accelerator, self.trainable_params, self.config.max_grad_norm)
            if accelerator.scaler is None and norm is not None and not bool(torch.isfinite(torch.as_tensor(norm))):
                self._nonfinite(f"the gradient norm became {float(norm)}", batch)
                return False
        return True

    def _count_step(self, parts: _StepParts) -> tuple[int, float, list[float]]:
        """Count the optimizer step: its loss (NaN when skipped) and learning rates go into the history.
        Returns (step, loss, learning rates)."""
        import torch

        p = self.progress
        p.global_step += 1
        step = p.global_step
        if parts.skip_step:
            value = float("nan")
            self.result.skipped_steps.append(step)
        else:
            losses = parts.micro_losses
            if len(losses) == 1:  # the usual case: no stack and mean over one value (the same number)
                value = float(losses[0])
            else:
                value = float(torch.stack(losses).mean()) if losses else float("nan")
        parts.micro_losses, parts.skip_step = [], False
        self._at_boundary = True
        lrs = self._current_lrs()
        p.losses.append(value)
        p.lrs.append(lrs)
        if math.isfinite(value):
            self.result.losses.append(value)
            self._recent.append(value)
        return step, value, lrs

    def _report_step(self, step: int, epoch: int, value: float, lrs: list[float], parts: _StepParts) -> None:
        """The step to the callbacks and the loggers (kohya's names)."""
        now = time.perf_counter()
        max_norm = parts.max_norm
        if max_norm is not None:
            self.cb.on_step_info(step, {"keys_scaled": max_norm[0], "average_key_norm": max_norm[1]})
        self.cb.on_progress(step, self.max_train_steps, value, lrs[0] if lrs else 0.0, epoch)
        if not self._trackers_on:
            return
        logs = {"loss/current": value,
                "loss/average": sum(self._recent) / len(self._recent) if self._recent else value,
                "images_per_second": parts.images * self.accelerator.num_processes / max(now - parts.t_last, 1e-9),
                "epoch": epoch}
        for name, group_lr in zip(self.group_names, lrs):
            logs[f"lr/{name}"] = group_lr
        logs.update(self._lr_free_logs())
        if max_norm is not None:  # kohya's names
            logs.update({"max_norm/keys_scaled": max_norm[0], "max_norm/average_key_norm": max_norm[1],
                         "max_norm/max_key_norm": max_norm[2]})
        self._log(logs, step)

    def _after_step(self, step: int) -> None:
        """Validation, checkpoint, sample images and a state the caller asks for, due at this step, then a pending
        Ctrl+C."""
        config = self.config
        if self.val_dataset is not None and validation_due_at_step(config, step):
            self._validate("step")
        if config.save_every_n_steps and step % config.save_every_n_steps == 0 and step < self.max_train_steps:
            self._save_checkpoint(step=step)
        if self._sampling_by_steps() and step % config.sample_every_n_steps == 0:
            self._sample(label=f"{step:06d}", step=step)
        self._state_if_due(step)
        self._check_stop()

    def _current_lrs(self) -> list[float]:
        try:
            return [float(x) for x in self.lr_scheduler.get_last_lr()]
        except Exception:  # noqa: BLE001 - some schedulers have no last lr before stepping
            return [float(g["lr"]) for g in self.optimizer.param_groups]

    def _lr_free_logs(self) -> dict[str, float]:
        """D-Adaptation / Prodigy: the effective learning rate d*lr per group, as kohya logs it."""
        out = {}
        for name, group in zip(self.group_names, self.optimizer.param_groups):
            if "d" in group and group.get("lr") is not None:
                try:
                    out[f"lr/d*lr/{name}"] = float(group["d"]) * float(group["lr"])
                except (TypeError, ValueError):
                    pass
        return out

    def _sampling_by_steps(self) -> bool:
        # kohya: sample_every_n_epochs takes precedence over sample_every_n_steps
        return bool(self.config.sample_every_n_steps) and not self.config.sample_every_n_epochs

    # ------------------------------------------------------- end of an epoch, of the run
    def _end_epoch(self, epoch: int) -> None:
        """After a full epoch that is not the last: epoch average, per-epoch save and samples."""
        config, p = self.config, self.progress
        p.epoch_end_done = True
        if self.val_dataset is not None and validation_due_at_epoch(config, epoch):
            self._validate("epoch")
        self._log_epoch_average(epoch)
        if self.save_every_n_epochs and epoch % self.save_every_n_epochs == 0:
            self._save_checkpoint(epoch=epoch)
        if config.sample_every_n_epochs and epoch % config.sample_every_n_epochs == 0:
            self._sample(label=f"e{epoch:06d}", step=p.global_step)
        self._check_stop()

    def _log_epoch_average(self, epoch: int) -> None:
        p = self.progress
        values = [v for v in p.losses[p.epoch_start_step:] if math.isfinite(v)]
        if values:
            self._log({"loss/epoch_average": sum(values) / len(values)}, p.global_step)

    def _finish(self) -> None:
        config, p = self.config, self.progress
        if self.val_dataset is not None and validation_due_at_epoch(config, p.epoch):
            self._validate("epoch")
        self._log_epoch_average(p.epoch)
        self.result.global_step = p.global_step
        self.result.epochs = p.epoch
        final = self._save_lora(lora_file_name(config.output_name, config.save_model_as))
        self.result.output_path = final
        if config.save_state or config.save_state_on_train_end:
            self._save_state(state_name(config.output_name))
        self._write_plot()
        if self.sample_prompts and self._last_sample_step != p.global_step:
            self._sample(label=f"e{p.epoch:06d}", step=p.global_step)

    # ------------------------------------------------------------ samples
    def _sample(self, label: str, step: int):
        self._last_sample_step = step
        if not self.sample_prompts or not self.accelerator.is_main_process:
            return
        from sd_scripts.training.sampling import SamplingAborted, generate_samples
        from sd_scripts.training.state import is_disk_full

        self.model.vae.to(self.accelerator.device)
        self.network.eval()
        try:
            with self._eval_weights():
                paths = generate_samples(
                    self.model, self.sample_prompts, out_dir=os.path.join(self.config.output_dir, "sample"),
                    output_name=self.config.output_name, label=label, default_sampler=self.config.sample_sampler,
                    v_parameterization=self.v_param, clip_skip=self.config.clip_skip, device=self.accelerator.device,
                    autocast=self.accelerator.autocast, should_stop=lambda: self._stop.requested,
                    zero_terminal_snr=self.config.zero_terminal_snr,
                    header=f"{self.config.output_name or ''} step {step}".strip(),
                )
        except SamplingAborted:
            return  # the stop request is handled by the caller's next check
        except OSError as e:
            if not is_disk_full(e):
                raise
            self._warn(f"disk full: the sample images of step {step} were not written")
            return
        finally:
            self.network.train()
        self.result.sample_files.extend(paths)
        self.cb.on_sample(paths)

    # ------------------------------------------------------------ NaN and stop
    def _nonfinite(self, what: str, batch) -> None:
        """A non-finite loss or gradient at the step being built: skip it or stop."""
        step = self.progress.global_step + 1
        files = ", ".join(os.path.basename(p) for p in batch.get("image_paths", []))
        if self.config.skip_nonfinite_steps:
            self._warn(f"{what} at step {step} (images: {files}); step skipped (skip_nonfinite_steps)")
            return
        kept = f"the last saved LoRA is kept: {self._last_lora}" if self._last_lora else "no LoRA was saved"
        raise TrainingStopped(
            f"{what} at step {step} (images: {files}); lower learning_rate or check these images, or set "
            f"skip_nonfinite_steps to skip such steps; {kept}", "learning_rate")

    def _check_stop(self) -> None:
        if self._any_process(self._stop.requested):
            self._interrupt()

    def _interrupt(self) -> None:
        """Save the LoRA as interrupted (and the state), then raise TrainingInterrupted."""
        config, p = self.config, self.progress
        saved: list[str] = []
        state = None
        if p.global_step > 0 and self._consistent:
            # paths from the bookkeeping every process keeps (only the main process writes)
            self._save_lora(f"{config.output_name or 'last'}-interrupted.{config.save_model_as}")
            saved.append(self._last_lora)
            if config.save_state and self._at_boundary:
                if self._last_state_step != p.global_step:
                    self._save_state(state_name(config.output_name, step=p.global_step))
                state = self._last_state
            self._write_plot()
        if state:
            text = f"interrupted at step {p.global_step}: saved {', '.join(saved)}; resume with resume={state}"
        elif saved:
            text = f"interrupted at step {p.global_step}: saved {', '.join(saved)}"
        elif p.global_step == 0:
            text = "interrupted before the first step; nothing was saved"
        else:
            text = f"interrupted at step {p.global_step} while the weights were being updated; nothing was saved"
        self.cb.on_message(text)
        raise TrainingInterrupted(text, saved, state)
