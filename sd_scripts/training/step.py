"""One batch's loss (kohya's order and formulas) and what it needs: latents from the VAE, text conditioning with its
per-caption cache, and the per-sample loss that training and validation share."""

from __future__ import annotations

import os

from sd_scripts.training.trainer_base import TrainerBase

__all__ = ["TrainStep"]


class TrainStep(TrainerBase):
    def _step_loss(self, batch):
        import torch

        from sd_scripts.training.noise import sample_noise

        config, device = self.config, self.accelerator.device
        with torch.no_grad():
            if batch.get("latents") is not None:
                latents = batch["latents"].to(device)
            else:
                latents = self._encode_images(batch["images"])
            latents = self.family.scale_latents(latents).to(self.weight_dtype)
        cond = self._encode_prompts(batch["captions"])
        noise = sample_noise(latents, config.noise_offset, config.multires_noise_iterations, config.multires_noise_discount,
                             random_strength=config.noise_offset_random_strength,
                             adaptive_noise_scale=config.adaptive_noise_scale)
        # the family's objective draws the timesteps and noises the latents (input perturbation included)
        noised = self.objective.noised(latents, noise)
        with self.accelerator.autocast():
            pred = self.family.predict(self.model, noised.model_input, noised.timesteps, cond, batch)
        return self._per_sample_loss(pred, noised, batch).mean()

    def _per_sample_loss(self, pred, noised, batch):
        """kohya's loss of a batch, per sample: the objective's target, ``loss_type`` (Huber threshold per
        timestep), alpha masks, the images' loss weights (prior_loss_weight) and the objective's weights (SNR
        weightings; FLUX's weighting_scheme); training and validation share it."""
        from sd_scripts.training.losses import per_sample_loss

        config = self.config
        pred, target = self.objective.prediction_and_target(pred, noised)
        loss = per_sample_loss(pred, target, config.loss_type, self.objective.huber_c(noised), batch.get("alpha_masks"))
        loss = loss * batch["loss_weights"].to(loss.device)
        weights = self.objective.loss_weights(noised)
        if weights is not None:
            loss = loss * weights
        return loss

    def _encode_images(self, images, generator=None):
        import torch

        with torch.no_grad():
            images = images.to(self.accelerator.device, dtype=self.vae_dtype)
            return self.model.vae.encode(images).latent_dist.sample(generator=generator).float()

    def _vae_cache_key(self) -> str:
        src = self.config.vae or self.config.pretrained_model_name_or_path
        return f"{self.family.name}|{os.path.abspath(src)}|{self.vae_dtype}"

    def _encode_prompts(self, captions: list[str]):
        """Text conditioning; with a frozen text encoder, each caption is encoded once (alone, so its
        value never depends on which captions shared its batch) and reused."""
        import torch

        config = self.config
        if self.train_te:
            with self.accelerator.autocast():
                return self.family.encode_prompts(self.model, captions, config.clip_skip, config.max_token_length,
                                                  config.weighted_captions)
        for caption in dict.fromkeys(c for c in captions if c not in self._prompt_cache):
            with torch.no_grad(), self.accelerator.autocast():
                cond = self.family.encode_prompts(self.model, [caption], config.clip_skip, config.max_token_length,
                                                  config.weighted_captions)
            if len(self._prompt_cache) >= 1024 and not self._te_cache_complete:
                self._prompt_cache.pop(next(iter(self._prompt_cache)))
            self._prompt_cache[caption] = cond
        rows = [self._prompt_cache[c] for c in captions]
        device = self.accelerator.device
        return {k: torch.cat([r[k] for r in rows]).to(device) for k in rows[0]}
