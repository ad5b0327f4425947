"""The validation the loop runs: the held-out images as a dataset of their own, their loss at fixed timesteps and
seeded noise, and its logs (what is held out and measured: :mod:`.validation`)."""

from __future__ import annotations

from sd_scripts.training.trainer_base import TrainerBase

__all__ = ["Validating"]


class Validating(TrainerBase):
    def _prepare_validation(self) -> None:
        """The held-out images (validation_split) as a dataset of their own, latents cached like the training ones."""
        import torch

        from sd_scripts.data.dataset import TrainDataset
        from sd_scripts.training.validation import resolve_validation_seed, validation_plan

        config = self.config
        self.val_dataset = None
        val_plan = validation_plan(self.plan.dataset)
        if val_plan is None:
            return
        self.validation_seed = resolve_validation_seed(config)
        self.val_dataset = TrainDataset(val_plan, config, self.validation_seed)
        if config.cache_latents:
            # a generator of its own: caching the held-out images draws nothing from the training random streams
            generator = torch.Generator().manual_seed(self.validation_seed)
            self.val_dataset.cache_latents(lambda images: self._encode_images(images, generator), config.vae_batch_size,
                                           config.cache_latents_to_disk, self._vae_cache_key())

    def _validate(self, *kinds: str) -> None:
        """Compute (or reuse, when the weights have not moved since) the validation loss and log it under
        ``loss/validation`` and kohya's ``loss/validation/<kind>_average|_divergence`` for each kind
        ("step", "epoch")."""
        if self.val_dataset is None:
            return
        p = self.progress
        if p.validations and p.validations[-1][0] == p.global_step:  # no optimizer step since: the same number
            value = p.validations[-1][1]
        else:
            value = self._validation_loss()
            p.validations.append((p.global_step, value))
            self.result.validation_losses.append((p.global_step, value))
            self.cb.on_message(f"validation loss {value:.5f} at step {p.global_step} (epoch {p.epoch}, "
                               f"{len(self.val_dataset.plan.images)} held-out images)")
        train_average = sum(self._recent) / len(self._recent) if self._recent else float("nan")
        logs = {"loss/validation": value}
        for kind in kinds:
            logs[f"loss/validation/{kind}_average"] = value
            logs[f"loss/validation/{kind}_divergence"] = value - train_average
        self._log(logs, p.global_step)

    def _validation_loss(self) -> float:
        """Mean loss over the held-out images at the fixed timesteps (see :mod:`.validation`). Each process
        takes its share of the batches; the sums are added up."""
        import torch

        accelerator, device = self.accelerator, self.accelerator.device
        count = len(self.val_dataset)
        if self.config.max_validation_steps:
            count = min(count, self.config.max_validation_steps)
        # the network last: its modes are the ones training set after the base models'
        modules = [self.model.unet, *self.model.text_encoders, self.network]
        modes = [m.training for m in modules]
        total = torch.zeros(2, dtype=torch.float64, device=device)
        try:
            for m in modules:
                m.eval()
            with torch.no_grad(), self._eval_weights():
                for index in range(accelerator.process_index, count, accelerator.num_processes):
                    self._add_validation_batch(index, total)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        if accelerator.num_processes > 1:
            total = accelerator.reduce(total, reduction="sum")
        return float(total[0] / total[1]) if float(total[1]) else float("nan")

    def _add_validation_batch(self, index: int, total) -> None:
        """Add batch ``index``'s summed loss over the fixed timesteps to ``total[0]`` and its count to ``total[1]``."""
        import torch

        from sd_scripts.training.validation import batch_generator_seed, validation_timesteps

        device = self.accelerator.device
        batch = self.val_dataset[index]
        generator = torch.Generator().manual_seed(batch_generator_seed(self.validation_seed, index))
        if batch.get("latents") is not None:
            latents = batch["latents"].to(device)
        else:
            latents = self._encode_images(batch["images"], generator)
        latents = self.family.scale_latents(latents).to(self.weight_dtype)
        cond = self._encode_prompts(batch["captions"])
        for t in validation_timesteps(self.config):
            timesteps = torch.full((latents.shape[0],), t, dtype=torch.long, device=device)
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            noised = self.objective.noised_at(latents, noise, timesteps, perturb=False)
            with self.accelerator.autocast():
                pred = self.family.predict(self.model, noised.model_input, noised.timesteps, cond, batch)
            losses = self._per_sample_loss(pred, noised, batch)
            total[0] += losses.double().sum()
            total[1] += losses.numel()
