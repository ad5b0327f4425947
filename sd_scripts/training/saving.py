"""What the loop writes: LoRA files and training states (main process, atomically, weights checked finite first),
the per-step and per-epoch checkpoints with kohya's ``save_last_n_*`` pruning, and the loss plot."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager

from sd_scripts.training.results import TrainingStopped, lora_file_name, loss_plot_name, state_name
from sd_scripts.training.trainer_base import TrainerBase

__all__ = ["Saving"]

_STEP_FILE = r"{name}-step(\d{{8}})\.{ext}"
_EPOCH_FILE = r"{name}-(\d{{6}})\.{ext}"
_STEP_STATE = r"{name}-step(\d{{8}})-state"
_EPOCH_STATE = r"{name}-(\d{{6}})-state"


class Saving(TrainerBase):
    @contextmanager
    def _eval_weights(self):
        """Schedule-free optimizers keep training weights apart from the weights to use: switch to the
        latter for saving and sampling, then put the training weights back exactly."""
        if not self.schedule_free:
            yield
            return
        import torch

        with torch.no_grad():
            saved = [p.detach().clone() for p in self.trainable_params]
            self.optimizer.eval()
            try:
                yield
            finally:
                self.optimizer.train()
                for p, s in zip(self.trainable_params, saved):
                    p.copy_(s)

    def _save_checkpoint(self, *, step: int | None = None, epoch: int | None = None) -> None:
        config = self.config
        self._save_lora(lora_file_name(config.output_name, config.save_model_as, step=step, epoch=epoch))
        if config.save_state:
            self._save_state(state_name(config.output_name, step=step, epoch=epoch))
        if self.accelerator.is_main_process:
            # states are pruned only by a run that writes states (never the one a run without save_state resumed from)
            if step is not None:
                keep_states = (config.save_last_n_steps_state or config.save_last_n_steps) if config.save_state else None
                self._prune(step, config.save_last_n_steps, keep_states, _STEP_FILE, _STEP_STATE,
                            keep_after=lambda n: step - n - 1)
            else:
                every = self.save_every_n_epochs or 1
                keep_states = (config.save_last_n_epochs_state or config.save_last_n_epochs) if config.save_state else None
                self._prune(epoch, config.save_last_n_epochs, keep_states, _EPOCH_FILE, _EPOCH_STATE,
                            keep_after=lambda n: epoch - every * n)

    def _prune(self, current, keep_files, keep_states, file_re, state_re, keep_after) -> None:
        """Remove per-step/per-epoch LoRAs and states older than the last N (kohya's save_last_n_*)."""
        import shutil

        config = self.config
        name = re.escape(config.output_name or ("at" if file_re is _STEP_FILE else "epoch"))
        state_file_name = re.escape(config.output_name or "last")
        ext = re.escape(config.save_model_as)
        try:
            entries = list(os.scandir(config.output_dir))
        except OSError:
            return
        for entry in entries:
            for keep, pattern, is_dir in ((keep_files, file_re.format(name=name, ext=ext), False),
                                          (keep_states, state_re.format(name=state_file_name), True)):
                if not keep:
                    continue
                m = re.fullmatch(pattern, entry.name)
                if not m or int(m.group(1)) > keep_after(keep) or int(m.group(1)) >= current:
                    continue
                try:
                    if is_dir and entry.is_dir():
                        shutil.rmtree(entry.path)
                    elif not is_dir and entry.is_file():
                        os.remove(entry.path)
                except OSError as e:
                    self._warn(f"could not remove the old {entry.path} ({e.strerror})")

    def _on_main(self, write):
        """Run ``write`` on the main process only; if it fails there, every process stops together."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.num_processes == 1:
            return write()
        error, result = None, None
        if accelerator.is_main_process:
            try:
                result = write()
            except Exception as e:  # noqa: BLE001 - re-raised below, after the others know
                error = e
        if self._any_process(error is not None):
            if error is not None:
                raise error
            raise TrainingStopped("the main process could not save (see its message); this process stopped too")
        return result

    def _check_finite_weights(self, what: str) -> None:
        import torch

        for name, tensor in self.network.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                kept = f"the last saved LoRA is kept: {self._last_lora}" if self._last_lora else "no LoRA was saved"
                raise TrainingStopped(
                    f"the network weights hold NaN/inf at step {self.progress.global_step} ({name}); the {what} was not "
                    f"saved; lower learning_rate (or use mixed_precision bf16 instead of fp16); {kept}", "learning_rate")

    def _save_lora(self, file_name: str) -> str | None:
        self._check_finite_weights("LoRA")  # every process: their weights are the same
        path = self._on_main(lambda: self._write_lora(file_name))
        self._last_lora = os.path.join(self.config.output_dir, file_name)  # on every process
        return path

    def _write_lora(self, file_name: str) -> str:
        from sd_scripts.files.lora_file import precision_dtype, save_lora_file
        from sd_scripts.files.metadata import finish_metadata
        from sd_scripts.training.state import disk_full_error, is_disk_full

        config, p = self.config, self.progress
        os.makedirs(config.output_dir, exist_ok=True)
        path = os.path.join(config.output_dir, file_name)
        metadata = finish_metadata(self.metadata, step=p.global_step, epoch=p.epoch, no_metadata=config.no_metadata)
        dtype = precision_dtype(config.save_precision)
        with self._eval_weights():
            state_dict = self.network.kohya_state_dict()
            try:
                save_lora_file(path, state_dict, metadata, dtype, config.save_model_as)
            except OSError as e:
                if not is_disk_full(e):
                    raise
                size = 2 if dtype is not None and getattr(dtype, "itemsize", 4) == 2 else 4
                needed = sum(v.numel() for v in state_dict.values()) * size + 64 * 1024
                raise disk_full_error("LoRA file", path, needed, self._last_state) from None
        self.result.saved_files.append(path)
        self.cb.on_save(path)
        return path

    def _state_if_due(self, step: int) -> None:
        """A state where the caller asks for one (callbacks.state_due: the queue's crash-recovery states)."""
        folder = self.cb.state_due(step)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            folder = broadcast_object_list([folder])[0]
        if not folder:
            return
        from sd_scripts.training.state import DiskFullError

        try:
            self._save_state(os.path.abspath(folder))
        except DiskFullError as e:  # the previous state stays; training goes on without a newer one
            self._warn(f"the state asked for at step {step} was not saved: {e}")

    def _save_state(self, dir_name: str) -> str | None:
        from sd_scripts.training.state import capture_rng

        self._check_finite_weights("training state")
        rng = [capture_rng()]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rng = gather_object(rng)  # every process's random states, for an exact multi-GPU resume
        path = self._on_main(lambda: self._write_state(dir_name, rng))
        # on every process, so that all of them agree on what an interrupt still has to save
        self._last_state, self._last_state_step = os.path.join(self.config.output_dir, dir_name), self.progress.global_step
        return path

    def _write_state(self, dir_name: str, rng: list) -> str:
        from sd_scripts.training.state import disk_full_error, folder_bytes, is_disk_full, save_train_state

        accelerator = self.accelerator
        path = os.path.join(self.config.output_dir, dir_name)
        network_state = self.network.state_dict()
        optimizer_state = self.optimizer.state_dict()
        try:
            save_train_state(
                path, network_state=network_state, optimizer_state=optimizer_state,
                scheduler_state=self.lr_scheduler.state_dict(),
                scaler_state=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                rng_states=rng, progress=self.progress, config=self.config,
            )
        except OSError as e:
            if not is_disk_full(e):
                raise
            needed = folder_bytes(self._last_state) if self._last_state else 0
            if not needed:
                needed = sum(t.numel() * t.element_size() for t in network_state.values()) * 3 + 256 * 1024
            raise disk_full_error("training state", path, needed, self._last_state) from None
        self.result.state_paths.append(path)
        self.cb.on_save(path)
        return path

    def _write_plot(self) -> None:
        if not self.accelerator.is_main_process or not self.progress.losses:
            return
        from sd_scripts.training.loss_plot import save_loss_plot

        p, config = self.progress, self.config
        path = os.path.join(config.output_dir, loss_plot_name(config.output_name))
        try:
            save_loss_plot(path, p.losses, p.lrs, self.group_names, validation=self.result.validation_losses,
                           title=f"{config.output_name or 'LoRA'}: {p.global_step} steps, {p.epoch} epochs")
        except OSError as e:
            self._warn(f"could not write the loss plot {path} ({e.strerror or e})")
            return
        self.result.plot_path = path
