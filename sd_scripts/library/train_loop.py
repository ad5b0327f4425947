"""The training loop: ``train(config, callbacks) -> TrainResult``.

Reads top to bottom: preflight, accelerator, models, dataset (and latent cache), network,
optimizer and schedule, then one loop over epochs and batches. Family-specific work
(text encoding, the UNet call, latent scale) goes through the model family object, so the
loop never branches on a family name. Progress, samples and saves reach the caller through
callbacks; nothing here prints.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from .callbacks import CallbackDispatcher
from .errors import ConfigError, UserError

__all__ = ["TrainResult", "TrainingStopped", "train", "lora_file_name"]


class TrainingStopped(UserError):
    """Training stopped on purpose (a non-finite loss); the last good LoRA is kept."""


@dataclass
class TrainResult:
    output_path: str | None
    saved_files: list[str] = field(default_factory=list)
    sample_files: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    global_step: int = 0
    epochs: int = 0
    losses: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def lora_file_name(output_name: str | None, ext: str, *, epoch: int | None = None, step: int | None = None) -> str:
    """kohya's names: ``name.ext``, ``name-000001.ext`` per epoch, ``name-step00000500.ext`` per step."""
    if epoch is not None:
        return f"{output_name or 'epoch'}-{epoch:06d}.{ext}"
    if step is not None:
        return f"{output_name or 'at'}-step{step:08d}.{ext}"
    return f"{output_name or 'last'}.{ext}"


def _weight_dtype(mixed_precision: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def train(config, callbacks: Any = None, *, model: Any = None) -> TrainResult:
    """Train a LoRA as ``config`` says; raise UserError subclasses for user mistakes.

    ``model`` (a ``LoadedModel``) skips loading ``pretrained_model_name_or_path``; benchmarks use it
    to train a model built in memory.
    """
    from .preflight import preflight

    cb = CallbackDispatcher(callbacks)
    plan = preflight(config, model_given=model is not None)
    for w in plan.warnings:
        cb.on_message(f"warning: {w}")
    return _Trainer(config, plan, cb, model).run()


class _Trainer:
    def __init__(self, config, plan, cb, model=None):
        self.config = config
        self.plan = plan
        self.cb = cb
        self.preloaded_model = model
        self._prompt_cache: dict = {}
        self.result = TrainResult(output_path=None, warnings=list(plan.warnings))

    # ----------------------------------------------------------------- setup
    def run(self) -> TrainResult:
        import torch
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from .dataset import TrainDataset
        from .model_loading import load_model
        from .noise import make_noise_scheduler
        from ..networks.factory import build_network

        config = self.config
        seed = config.seed if config.seed is not None else int.from_bytes(os.urandom(4), "little") % (2**31)
        self.seed = seed
        self.accelerator = accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=self._log_with(),
            project_dir=config.logging_dir,
        )
        set_seed(seed)
        device = accelerator.device
        self.weight_dtype = weight_dtype = _weight_dtype(config.mixed_precision) if device.type == "cuda" else torch.float32

        model = self.preloaded_model if self.preloaded_model is not None else load_model(config)
        self.model = model
        family = model.family
        self.family = family
        self.v_param = model.v_parameterization
        self.noise_scheduler = make_noise_scheduler(self.v_param)
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(device)

        # Frozen base models.
        for module in [model.unet, model.vae, *model.text_encoders]:
            module.requires_grad_(False)
        if config.xformers:
            model.unet.enable_xformers_memory_efficient_attention()
        vae_dtype = torch.float32 if device.type != "cuda" else weight_dtype
        model.vae.to(device, dtype=vae_dtype).eval()
        self.vae_dtype = vae_dtype

        # Dataset and latent cache.
        plan = self.plan
        dataset = TrainDataset(plan.dataset, config, seed)
        self.dataset = dataset
        self.result.tag_frequency = dict(plan.dataset.tag_frequency)
        if config.cache_latents:
            self.cb.on_message("caching latents")
            dataset.cache_latents(self._encode_images, config.vae_batch_size, config.cache_latents_to_disk,
                                  self._vae_cache_key())
            if not config.sample_prompts:
                model.vae.to("cpu")

        # Network.
        train_unet = not config.network_train_text_encoder_only
        train_te = not config.network_train_unet_only
        self.train_te = train_te
        built_net = build_network(config, model, train_unet=train_unet, train_text_encoder=train_te)
        for w in built_net.warnings:
            self.cb.on_message(f"warning: {w}")
        self.network = network = built_net.network
        network.to(device)

        model.unet.to(device, dtype=weight_dtype)
        for te in model.text_encoders:
            te.to(device, dtype=weight_dtype)
        if config.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            model.unet.train()
            if train_te:
                for te in model.text_encoders:
                    te.gradient_checkpointing_enable()
                    te.train()
                    te.get_input_embeddings().requires_grad_(True)
        else:
            model.unet.eval()
            for te in model.text_encoders:
                te.eval()
        network.train()

        # Optimizer, data loader, schedule.
        from .optimizers import build_lr_scheduler, build_optimizer

        params, self.group_names = network.prepare_optimizer_params(config.text_encoder_lr, config.unet_lr, config.learning_rate)
        if not params:
            raise ConfigError("learning_rate: every learning rate is 0, so nothing would train; set unet_lr or text_encoder_lr above 0")
        built = build_optimizer(config, params)
        optimizer, self.optimizer_name = built[0], built[1]
        for w in (built[2] if len(built) > 2 else []):
            self.cb.on_message(f"warning: {w}")
        self.trainable_params = [p for group in params for p in group["params"]]

        dataloader = torch.utils.data.DataLoader(
            dataset, batch_size=1, shuffle=False, collate_fn=_first,
            num_workers=config.max_data_loader_n_workers,
            persistent_workers=config.persistent_data_loader_workers and config.max_data_loader_n_workers > 0,
        )
        num_processes = accelerator.num_processes
        ga = config.gradient_accumulation_steps
        if config.max_train_epochs:
            max_train_steps = config.max_train_epochs * math.ceil(len(dataloader) / num_processes / ga)
        else:
            max_train_steps = config.max_train_steps
        self.max_train_steps = max_train_steps
        lr_scheduler = build_lr_scheduler(config, optimizer, max_train_steps * num_processes)
        optimizer, dataloader, lr_scheduler = accelerator.prepare(optimizer, dataloader, lr_scheduler)
        self.optimizer, self.dataloader, self.lr_scheduler = optimizer, dataloader, lr_scheduler
        steps_per_epoch = math.ceil(len(dataloader) / ga)
        self.num_train_epochs = math.ceil(max_train_steps / steps_per_epoch)
        self.save_every_n_epochs = config.save_every_n_epochs
        if config.save_n_epoch_ratio:
            self.save_every_n_epochs = max(1, self.num_train_epochs // config.save_n_epoch_ratio)

        self._prepare_metadata(built_net, len(dataloader), num_processes)
        self._prepare_samples()
        if self.accelerator.is_main_process and (config.log_with or config.logging_dir):
            self._init_trackers()
        self.cb.on_start({
            "model": config.pretrained_model_name_or_path,
            "family": family.name + (" (v-prediction)" if self.v_param else ""),
            "images": plan.dataset.num_train_images,
            "reg_images": plan.dataset.num_reg_images,
            "batches_per_epoch": len(dataloader),
            "epochs": self.num_train_epochs,
            "max_train_steps": max_train_steps,
            "batch_size": config.train_batch_size,
            "device": str(device),
            "seed": seed,
        })
        try:
            self._loop()
        finally:
            if getattr(self, "_trackers_on", False):
                accelerator.end_training()
        self.cb.on_end(self.result)
        return self.result

    def _log_with(self):
        if self.config.log_with:
            return self.config.log_with
        return "tensorboard" if self.config.logging_dir else None

    def _init_trackers(self):
        import time

        name = (self.config.log_prefix or "") + (self.config.output_name or "network_train")
        try:
            self.accelerator.init_trackers(name + time.strftime("_%Y%m%d%H%M%S"))
            self._trackers_on = True
        except Exception as e:  # a missing tensorboard/wandb package must not stop a run
            self.cb.on_message(f"warning: logging disabled ({e})")
            self._trackers_on = False

    def _vae_cache_key(self) -> str:
        src = self.config.vae or self.config.pretrained_model_name_or_path
        return f"{self.family.name}|{os.path.abspath(src)}|{self.vae_dtype}"

    def _encode_images(self, images):
        import torch

        with torch.no_grad():
            images = images.to(self.accelerator.device, dtype=self.vae_dtype)
            return self.model.vae.encode(images).latent_dist.sample().float()

    def _prepare_metadata(self, built_net, num_batches, num_processes):
        from .lora_file import file_sha256, legacy_model_hash
        from .metadata import build_training_metadata

        hashes = {}
        path = self.config.pretrained_model_name_or_path
        if path and os.path.isfile(path):
            hashes = {"ss_sd_model_hash": legacy_model_hash(path), "ss_new_sd_model_hash": file_sha256(path)}
        self.metadata = build_training_metadata(
            self.config, family=self.family, v_parameterization=self.v_param, dataset=self.dataset,
            network_dim=built_net.network_dim, network_alpha=built_net.network_alpha, network_args=built_net.network_args,
            optimizer_name=self.optimizer_name, num_batches_per_epoch=num_batches, num_train_epochs=self.num_train_epochs,
            max_train_steps=self.max_train_steps, lr_warmup_steps=_warmup_steps(self.config.lr_warmup_steps, self.max_train_steps),
            num_processes=num_processes, model_hashes=hashes,
        )
        from .lora_file import build_modelspec

        res = [int(p) for p in str(self.config.resolution).split(",")]
        self.metadata.update(build_modelspec(
            self.family.modelspec_architecture(self.v_param), title=self.config.output_name or "LoRA",
            resolution=f"{res[0]}x{res[-1]}", prediction_type="v" if self.v_param else "epsilon",
            clip_skip=self.config.clip_skip,
        ))
        self.result.metadata = self.metadata

    def _prepare_samples(self):
        self.sample_prompts = []
        if self.config.sample_prompts:
            from .sampling import load_sample_prompts

            self.sample_prompts = load_sample_prompts(self.config.sample_prompts)

    # ------------------------------------------------------------------ loop
    def _loop(self):
        import torch

        config, accelerator = self.config, self.accelerator
        global_step = 0
        recent: list[float] = []
        self._last_sample_step = -1
        if config.sample_at_first:
            self._sample(label=f"{0:06d}", step=0)
        epoch = 0
        for epoch in range(1, self.num_train_epochs + 1):
            self.dataloader.set_epoch(epoch)  # accelerate passes it on to the dataset (1-based)
            for batch in self.dataloader:
                self.dataset.set_step(global_step, self.max_train_steps)
                with accelerator.accumulate(self.network):
                    loss = self._step_loss(batch)
                    if not torch.isfinite(loss):
                        raise TrainingStopped(
                            f"loss became {loss.item()} at step {global_step + 1} (images: "
                            f"{', '.join(os.path.basename(p) for p in batch['image_paths'])}); lower learning_rate or "
                            f"check these images; the last saved LoRA is kept")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        if accelerator.num_processes > 1:
                            self._all_reduce_grads()
                        if config.max_grad_norm:
                            accelerator.clip_grad_norm_(self.trainable_params, config.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                value = loss.detach().item()
                self.result.losses.append(value)
                recent.append(value)
                recent = recent[-len(self.dataloader):]
                lr = self.lr_scheduler.get_last_lr()[0]
                self.cb.on_progress(global_step, self.max_train_steps, value, lr, epoch)
                if getattr(self, "_trackers_on", False):
                    logs = {"loss/current": value, "loss/average": sum(recent) / len(recent)}
                    for name, group_lr in zip(self.group_names, self.lr_scheduler.get_last_lr()):
                        logs[f"lr/{name}"] = group_lr
                    accelerator.log(logs, step=global_step)
                if config.save_every_n_steps and global_step % config.save_every_n_steps == 0 and global_step < self.max_train_steps:
                    self._save(lora_file_name(config.output_name, config.save_model_as, step=global_step), global_step, epoch)
                    self._remove_old_step_file(global_step)
                if config.sample_every_n_steps and global_step % config.sample_every_n_steps == 0:
                    self._sample(label=f"{global_step:06d}", step=global_step)
                if global_step >= self.max_train_steps:
                    break
            self.result.epochs = epoch
            last_epoch = global_step >= self.max_train_steps or epoch == self.num_train_epochs
            if self.save_every_n_epochs and epoch % self.save_every_n_epochs == 0 and not last_epoch:
                self._save(lora_file_name(config.output_name, config.save_model_as, epoch=epoch), global_step, epoch)
                self._remove_old_epoch_file(epoch)
            if config.sample_every_n_epochs and epoch % config.sample_every_n_epochs == 0 and not last_epoch:
                self._sample(label=f"e{epoch:06d}", step=global_step)
            if last_epoch:
                break
        self.result.global_step = global_step
        final = self._save(lora_file_name(config.output_name, config.save_model_as), global_step, epoch)
        self.result.output_path = final
        if self.sample_prompts and self._last_sample_step != global_step:
            self._sample(label=f"e{epoch:06d}", step=global_step)

    def _step_loss(self, batch):
        import torch

        from .noise import add_noise, min_snr_weights, per_sample_mse, sample_noise, sample_timesteps, snr_of, velocity_target

        config, device = self.config, self.accelerator.device
        with torch.no_grad():
            if batch.get("latents") is not None:
                latents = batch["latents"].to(device)
            else:
                latents = self._encode_images(batch["images"])
            latents = (latents * self.family.latent_scale).to(self.weight_dtype)
        cond = self._encode_prompts(batch["captions"])
        noise = sample_noise(latents, config.noise_offset, config.multires_noise_iterations, config.multires_noise_discount)
        timesteps = sample_timesteps(latents.shape[0], device)
        noisy = add_noise(self.alphas_cumprod, latents, noise, timesteps)
        with self.accelerator.autocast():
            pred = self.family.predict(self.model, noisy, timesteps, cond, batch)
        target = velocity_target(self.alphas_cumprod, latents, noise, timesteps) if self.v_param else noise
        loss = per_sample_mse(pred, target) * batch["loss_weights"].to(device)
        if config.min_snr_gamma:
            loss = loss * min_snr_weights(snr_of(self.alphas_cumprod, timesteps), config.min_snr_gamma, self.v_param)
        return loss.mean()

    def _encode_prompts(self, captions: list[str]):
        """Text conditioning; with a frozen text encoder, each caption is encoded once and reused."""
        import torch

        config = self.config
        if self.train_te:
            with self.accelerator.autocast():
                return self.family.encode_prompts(self.model, captions, config.clip_skip, config.max_token_length,
                                                  config.weighted_captions)
        # Conditioning tensors are batch-first, so rows can be cached per caption and stacked.
        missing = list(dict.fromkeys(c for c in captions if c not in self._prompt_cache))
        if missing:
            with torch.no_grad(), self.accelerator.autocast():
                cond = self.family.encode_prompts(self.model, missing, config.clip_skip, config.max_token_length,
                                                  config.weighted_captions)
            for i, caption in enumerate(missing):
                if len(self._prompt_cache) >= 1024:
                    self._prompt_cache.pop(next(iter(self._prompt_cache)))
                self._prompt_cache[caption] = {k: v[i : i + 1] for k, v in cond.items()}
        rows = [self._prompt_cache[c] for c in captions]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def _all_reduce_grads(self):
        for p in self.trainable_params:
            if p.grad is not None:
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    # ------------------------------------------------------------ save/sample
    def _save(self, file_name: str, step: int, epoch: int) -> str | None:
        from .lora_file import precision_dtype, save_lora_file
        from .metadata import finish_metadata

        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        os.makedirs(self.config.output_dir, exist_ok=True)
        path = os.path.join(self.config.output_dir, file_name)
        metadata = finish_metadata(self.metadata, step=step, epoch=epoch, no_metadata=self.config.no_metadata)
        save_lora_file(path, self.network.kohya_state_dict(), metadata, precision_dtype(self.config.save_precision),
                       self.config.save_model_as)
        self.result.saved_files.append(path)
        self.cb.on_save(path)
        return path

    def _remove_old_epoch_file(self, epoch: int):
        n, every = self.config.save_last_n_epochs, self.save_every_n_epochs
        if n and every:
            old = epoch - every * n
            if old > 0:
                self._remove_output(lora_file_name(self.config.output_name, self.config.save_model_as, epoch=old))

    def _remove_old_step_file(self, step: int):
        n, every = self.config.save_last_n_steps, self.config.save_every_n_steps
        if n and every:
            old = (step - n - 1) - ((step - n - 1) % every)
            if old > 0:
                self._remove_output(lora_file_name(self.config.output_name, self.config.save_model_as, step=old))

    def _remove_output(self, file_name: str):
        path = os.path.join(self.config.output_dir, file_name)
        if self.accelerator.is_main_process and os.path.isfile(path):
            os.remove(path)

    def _sample(self, label: str, step: int):
        self._last_sample_step = step
        if not self.sample_prompts or not self.accelerator.is_main_process:
            return
        from .sampling import generate_samples

        self.model.vae.to(self.accelerator.device)
        self.network.eval()
        try:
            paths = generate_samples(
                self.model, self.sample_prompts, out_dir=os.path.join(self.config.output_dir, "sample"),
                output_name=self.config.output_name, label=label, default_sampler=self.config.sample_sampler,
                v_parameterization=self.v_param, clip_skip=self.config.clip_skip, device=self.accelerator.device,
            )
        finally:
            self.network.train()
        self.result.sample_files.extend(paths)
        self.cb.on_sample(paths)


def _first(items):
    return items[0]


def _warmup_steps(value, max_steps: int) -> int:
    if isinstance(value, str) and value.strip().endswith("%"):
        return int(float(value.strip()[:-1]) / 100 * max_steps)
    value = float(value or 0)
    return int(value * max_steps) if 0 < value < 1 else int(value)
