"""The training run's setup, one named step each, in the order :meth:`sd_scripts.training.loop._Trainer.run` calls
them: accelerator and precision, the frozen base model, datasets and latent cache, the network, the base models'
devices and precisions, the text-encoder cache, training modes, the optimizer, the schedule and data loader, and
what the outputs need (metadata, sample prompts, logs).

The order is part of the results: every step that draws random numbers (loading, latent caching, the network's
initial weights) draws them from the run's seed in this order, so a LoRA trained with the same seed is the same file.
"""

from __future__ import annotations

import math
import os
import time

from sd_scripts.core.errors import ConfigError
from sd_scripts.core.problems import Problems
from sd_scripts.training.speed import (CompileClock, PhaseMemory, apply_speed_options, bf16_cpu_note,
                                       cache_accelerate_package_checks, release_vae)
from sd_scripts.training.trainer_base import TrainerBase

__all__ = ["SetupSteps"]


class SetupSteps(TrainerBase):
    def _start_accelerator(self) -> None:
        """The seed (a resumed run keeps its state's), accelerate with the mixed precision and the log folder, the
        frozen weights' dtypes, and the output folder cleaned up after a killed run."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from sd_scripts.training.state import read_progress, recover_output_folder

        config = self.config
        cache_accelerate_package_checks()
        self.seed = seed = self._choose_seed(read_progress(config.resume) if config.resume else None)
        # kohya's log layout: <logging_dir>/<log_prefix><start time>/<log_tracker_name or network_train>/
        self.run_stamp = time.strftime("%Y%m%d%H%M%S")
        log_dir = os.path.join(config.logging_dir, (config.log_prefix or "") + self.run_stamp) if config.logging_dir else None
        _forget_other_precision(config.mixed_precision)
        self.accelerator = accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=self._log_with(),
            project_dir=log_dir,
        )
        set_seed(seed)
        self.weight_dtype, self.vae_dtype = _base_dtypes(config, accelerator.device)
        self.memory = PhaseMemory(accelerator.device.type)  # peak memory of each phase, reported at the end
        note = bf16_cpu_note(config.mixed_precision, accelerator.device.type)
        if note:
            self.cb.on_message(note)
        if accelerator.is_main_process and config.output_dir:
            for line in recover_output_folder(config.output_dir, config.output_name):
                self.cb.on_message(f"cleaned up after an interrupted run: {line}")

    def _choose_seed(self, resume_info: dict | None) -> int:
        config = self.config
        if resume_info is None:
            return config.seed if config.seed is not None else int.from_bytes(os.urandom(4), "little") % (2**31)
        seed = int(resume_info.get("seed", 0))
        if config.seed is not None and int(config.seed) != seed:
            self._warn(f"resume: the state was trained with seed {seed}; continuing with it (not {config.seed})")
        return seed

    def _log_with(self):
        if self.config.log_with:
            return self.config.log_with
        return "tensorboard" if self.config.logging_dir else None

    def _load_base_model(self) -> None:
        """The model (given, or loaded in the training precision), ``base_weights`` merged in, the family's training
        objective (noise schedule and target); every base weight frozen, the VAE on the device."""
        from sd_scripts.models.loading import load_model
        from sd_scripts.training.objectives import make_objective

        config, device = self.config, self.accelerator.device
        # frozen weights straight in the training precision: a float32 copy of SDXL alone is 13.5 GB of RAM
        model = self.preloaded_model if self.preloaded_model is not None else _in_turn(self.accelerator, lambda: load_model(
            config, dtype=self.weight_dtype, vae_dtype=self.vae_dtype,
            device=device if config.lowram and device.type == "cuda" else None))
        self.model = model
        self.family = model.family
        if not model.options:  # a model given in memory: the family's calls read these settings
            model.options = self.family.training_options(config)
        if config.base_weights:  # kohya: merged into the base model before the network is built
            from sd_scripts.networks.base_weights import merge_base_weights

            for line in merge_base_weights(model, config.base_weights, config.base_weights_multiplier):
                self.cb.on_message(line)
        self.memory.mark("load")
        self.v_param = model.v_parameterization
        self._check_prediction_type()
        self.objective = make_objective(self.family, config, self.v_param, device)
        self.alphas_cumprod = self.objective.alphas_cumprod  # the DDPM schedule (None for flow matching)

        for module in [model.unet, model.vae, *model.text_encoders]:
            module.requires_grad_(False)
        if config.xformers and hasattr(model.unet, "enable_xformers_memory_efficient_attention"):
            model.unet.enable_xformers_memory_efficient_attention()
        model.vae.to(device, dtype=self.vae_dtype).eval()

    def _check_prediction_type(self) -> None:
        """Settings that depend on epsilon or v prediction; preflight checks them when it can read the model."""
        from sd_scripts.training.losses import prediction_type_problems

        problems = Problems()
        prediction_type_problems(self.config, self.v_param, problems)
        problems.raise_errors(one_as_is=True)
        if "v_parameterization" not in self.plan.model_info:  # preflight could not warn
            for w in problems.warnings:
                self._warn(w)

    def _build_datasets(self) -> None:
        """The training dataset with its latents cached (cache_latents), then the held-out validation images."""
        from sd_scripts.data.dataset import TrainDataset

        config, plan = self.config, self.plan
        self.dataset = dataset = TrainDataset(plan.dataset, config, self.seed)
        self.result.tag_frequency = dict(plan.dataset.tag_frequency)
        if config.cache_latents:
            self.cb.on_message("caching latents")
            dataset.cache_latents(self._encode_images, config.vae_batch_size, config.cache_latents_to_disk,
                                  self._vae_cache_key())
        self._prepare_validation()
        if config.cache_latents and not config.sample_prompts:
            # every latent is cached and no sample will be drawn: nothing needs the VAE again
            release_vae(self.model, owned=self.preloaded_model is None)

    def _build_network(self):
        """The trainable network, on the device in float32 (or the training precision with full_fp16/full_bf16);
        returns factory's ``BuiltNetwork`` (dims and args for the metadata)."""
        import torch

        from sd_scripts.networks.factory import build_network

        config, device = self.config, self.accelerator.device
        self.train_te = not config.network_train_unet_only
        built = build_network(config, self.model, train_unet=not config.network_train_text_encoder_only,
                              train_text_encoder=self.train_te)
        for w in built.warnings:
            self._warn(w)
        self.network = network = built.network
        if config.scale_weight_norms and not network.supports_max_norm():
            raise ConfigError("scale_weight_norms: this LyCORIS network has no max-norm regularization (LyCORIS has "
                              "it for LoCon, LoHa, LoKr and OFT); turn scale_weight_norms off or change algo",
                              "scale_weight_norms")
        # trainable weights in float32 whatever the base model's dtype; full_fp16/full_bf16 (kohya) put them in the
        # training precision too, for the memory
        self.full_half = (config.full_fp16 or config.full_bf16) and self.weight_dtype != torch.float32
        network.to(device, dtype=self.weight_dtype if self.full_half else torch.float32)
        if config.lowram and device.type != "cuda":
            self._warn("lowram: has no effect here (no CUDA device to load the model into)")
        if (config.full_fp16 or config.full_bf16) and not self.full_half:
            self._warn(f"{'full_fp16' if config.full_fp16 else 'full_bf16'}: has no effect here (no CUDA device: the "
                       "network trains in float32)")
        return built

    def _place_text_encoders(self) -> None:
        """The frozen text encoders on the device, in float8 with fp8_base on CUDA."""
        import torch

        config, device, model = self.config, self.accelerator.device, self.model
        _, te_dtype = _frozen_dtypes(config, self.weight_dtype, device)
        for te in model.text_encoders:
            te.to(device, dtype=te_dtype)
            if te_dtype != self.weight_dtype:
                for module in te.modules():
                    if isinstance(module, torch.nn.Embedding):
                        module.to(dtype=self.weight_dtype)  # no float8 embedding lookup (kohya keeps them too)
        self.te_dtype = te_dtype

    def _place_denoiser(self) -> None:
        """The frozen denoiser on the device, after the text encoders have cached their outputs and left it (so
        FLUX.1's T5 and transformer never share the GPU): the family's placement (fp8_base, blocks_to_swap)."""
        import torch

        config, device = self.config, self.accelerator.device
        unet_dtype, _ = _frozen_dtypes(config, self.weight_dtype, device)
        self.denoiser_placement = self.family.place_denoiser(self.model, config, device, unet_dtype)
        float8 = any(p.dtype == torch.float8_e4m3fn for p in self.model.unet.parameters())
        if (config.fp8_base or config.fp8_base_unet) and not float8:
            self._warn(f"{'fp8_base' if config.fp8_base else 'fp8_base_unet'}: has no effect here (float8 weights "
                       "need a CUDA device)")
        if config.blocks_to_swap and self.denoiser_placement is None:
            self._warn("blocks_to_swap: has no effect here (no CUDA device to swap blocks into)")

    def _cache_text_encoder_outputs(self) -> None:
        """cache_text_encoder_outputs: encode every caption once now, then free the text encoders' memory."""
        from sd_scripts.data.te_cache import build_text_encoder_cache, wants_text_encoder_cache

        config, model = self.config, self.model
        self._te_cache_complete = False
        if self.train_te or not wants_text_encoder_cache(config):
            return
        self.cb.on_message("caching text encoder outputs")
        key = f"{os.path.abspath(config.pretrained_model_name_or_path or model.model_path)}|{self.te_dtype}"
        cache = build_text_encoder_cache(config, self.plan.dataset, model, settings_key=key,
                                         context=self.accelerator.autocast)
        self._prompt_cache = cache.rows
        self._te_cache_complete = True
        for te in model.text_encoders:
            te.to("cpu")

    def _apply_speed_options(self) -> None:
        """channels_last and torch_compile (regional) on the denoiser, now that the network is injected and the
        model has its device, dtype and mode; with torch_compile the compile time is reported apart."""
        for line in apply_speed_options(self.config, self.model.unet):
            self.cb.on_message(line)
        if self.config.torch_compile:
            self.cb = CompileClock(self.cb, time.perf_counter())

    def _set_training_modes(self) -> None:
        """Gradient checkpointing (the base models then run in train mode, as kohya's), else eval mode."""
        config, model = self.config, self.model
        if config.gradient_checkpointing:
            self.family.enable_gradient_checkpointing(model, config)
            model.unet.train()
            if self.train_te:
                for te in model.text_encoders:
                    te.gradient_checkpointing_enable()
                    te.train()
                    te.get_input_embeddings().requires_grad_(True)
        else:
            model.unet.eval()
            for te in model.text_encoders:
                te.eval()
        self.network.train()

    def _build_optimizer(self):
        """The network's parameter groups (one per learning rate) and the optimizer over them."""
        from sd_scripts.training.optimizers import build_optimizer, is_schedule_free

        config = self.config
        params, self.group_names = self.network.prepare_optimizer_params(config.text_encoder_lr, config.unet_lr,
                                                                         config.learning_rate)
        if not params:
            raise ConfigError("learning_rate: every learning rate is 0, so nothing would train; set unet_lr or text_encoder_lr above 0")
        built = build_optimizer(config, params)
        self.optimizer, self.optimizer_name = built.optimizer, built.ss_optimizer
        for w in built.warnings:
            self._warn(w)
        self.schedule_free = is_schedule_free(self.optimizer)
        self.trainable_params = [p for group in params for p in group["params"]]

    def _build_schedule_and_loader(self) -> None:
        """The run's length in steps and epochs, the data loader and the learning-rate schedule, prepared by
        accelerate."""
        from sd_scripts.training.data_loader import build_data_loader
        from sd_scripts.training.optimizers import build_lr_scheduler

        config, accelerator = self.config, self.accelerator
        ga, num_processes = config.gradient_accumulation_steps, accelerator.num_processes
        if config.max_train_epochs:
            self.max_train_steps = config.max_train_epochs * math.ceil(len(self.dataset) / num_processes / ga)
        else:
            self.max_train_steps = config.max_train_steps
        self.loader_view, dataloader = build_data_loader(config, self.dataset, self.plan.dataset, self.max_train_steps,
                                                         self.seed)
        problems = Problems()
        lr_scheduler = build_lr_scheduler(config, self.optimizer, self.max_train_steps, num_processes=num_processes,
                                          warnings=problems.warnings)
        for w in problems.warnings:
            self._warn(w)
        self.optimizer, self.dataloader, self.lr_scheduler = accelerator.prepare(self.optimizer, dataloader, lr_scheduler)
        if self.full_half and accelerator.scaler is not None:
            _allow_fp16_gradients(accelerator.scaler)
        self.steps_per_epoch = math.ceil(len(self.dataloader) / ga)
        self.num_train_epochs = math.ceil(self.max_train_steps / self.steps_per_epoch)
        self.save_every_n_epochs = config.save_every_n_epochs
        if config.save_n_epoch_ratio:
            self.save_every_n_epochs = max(1, self.num_train_epochs // config.save_n_epoch_ratio)

    def _prepare_outputs(self, built_net) -> None:
        """The files' metadata, the sample prompts, and the loggers (main process)."""
        config = self.config
        self._prepare_metadata(built_net, len(self.dataloader), self.accelerator.num_processes)
        self.sample_prompts = []
        if config.sample_prompts:
            from sd_scripts.training.sampling import load_sample_prompts

            self.sample_prompts = load_sample_prompts(config.sample_prompts)
        if self.accelerator.is_main_process and (config.log_with or config.logging_dir):
            self._init_trackers()

    def _prepare_metadata(self, built_net, num_batches, num_processes):
        from sd_scripts.files.lora_file import build_modelspec, file_sha256, legacy_model_hash
        from sd_scripts.files.metadata import build_training_metadata
        from sd_scripts.files.user_metadata import modelspec_title, user_modelspec

        config = self.config
        hashes = {}
        path = config.pretrained_model_name_or_path
        if path and os.path.isfile(path):
            hashes = {"ss_sd_model_hash": legacy_model_hash(path), "ss_new_sd_model_hash": file_sha256(path)}
        self.metadata = build_training_metadata(
            config, family=self.family, v_parameterization=self.v_param, dataset=self.dataset,
            network_dim=built_net.network_dim, network_alpha=built_net.network_alpha, network_args=built_net.network_args,
            optimizer_name=self.optimizer_name, num_batches_per_epoch=num_batches, num_train_epochs=self.num_train_epochs,
            max_train_steps=self.max_train_steps, lr_warmup_steps=_warmup_steps(config.lr_warmup_steps, self.max_train_steps),
            num_processes=num_processes, model_hashes=hashes,
        )
        res = [int(p) for p in str(config.resolution).split(",")]
        timesteps = None
        if config.min_timestep is not None or config.max_timestep is not None:  # kohya writes it only then
            high = config.max_timestep
            timesteps = (config.min_timestep or 0, 1000 if high is None else high)
        self.metadata.update(build_modelspec(
            self.family.modelspec_architecture(self.v_param, self.model), title=modelspec_title(config) or "LoRA",
            resolution=f"{res[0]}x{res[-1]}", prediction_type=self.family.modelspec_prediction_type(self.v_param),
            clip_skip=config.clip_skip if self.family.uses_clip_skip else None, timestep_range=timesteps,
            extra=user_modelspec(config), implementation=self.family.modelspec_implementation,
        ))
        self.result.metadata = self.metadata

    def _init_trackers(self):
        config = self.config
        init_kwargs = {}
        if config.log_with in ("wandb", "all"):
            run_name = config.wandb_run_name or f"{config.log_prefix or ''}{config.output_name or 'lora'}_{self.run_stamp}"
            init_kwargs["wandb"] = {"name": run_name}
        try:
            self.accelerator.init_trackers(config.log_tracker_name or "network_train", init_kwargs=init_kwargs)
            self._trackers_on = True
        except Exception as e:  # noqa: BLE001 - a tracker that cannot start (no login, no network) must not stop a run
            self._warn(f"logging disabled ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
            self._trackers_on = False

    def _announce_start(self) -> None:
        config, plan = self.config, self.plan
        self.cb.on_start({
            "model": config.pretrained_model_name_or_path,
            "family": self.family.name + (" (v-prediction)" if self.v_param else ""),
            "images": plan.dataset.num_train_images,
            "reg_images": plan.dataset.num_reg_images,
            "batches_per_epoch": len(self.dataloader),
            "epochs": self.num_train_epochs,
            "max_train_steps": self.max_train_steps,
            "batch_size": config.train_batch_size,
            "device": str(self.accelerator.device),
            "seed": self.seed,
            "start_step": self.progress.global_step,
            **({"resumed_from": f"{config.resume} (step {self.progress.global_step})"} if config.resume else {}),
        })


# ---------------------------------------------------------------------------------------------- precision


def _weight_dtype(mixed_precision: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _base_dtypes(config, device):
    """(frozen weights, VAE) dtypes: the mixed precision on CUDA, bf16 on a CPU that computes it natively, float32
    elsewhere (``speed.frozen_weight_dtype``); ``no_half_vae`` keeps the VAE in float32 (SDXL's VAE overflows in
    fp16)."""
    import torch

    from sd_scripts.training.speed import frozen_weight_dtype

    weight_dtype = frozen_weight_dtype(config.mixed_precision, device.type)
    return weight_dtype, torch.float32 if config.no_half_vae else weight_dtype


def _frozen_dtypes(config, weight_dtype, device):
    """(UNet, text encoders) dtypes of the frozen weights while training: kohya's ``fp8_base`` stores both in
    float8 (e4m3) on CUDA, ``fp8_base_unet`` the UNet only; CUDA's autocast computes with them in the mixed
    precision. Elsewhere, and without these settings, the training precision."""
    import torch

    fp8 = bool(config.fp8_base or config.fp8_base_unet) and device.type == "cuda"
    unet = torch.float8_e4m3fn if fp8 else weight_dtype
    return unet, torch.float8_e4m3fn if fp8 and not config.fp8_base_unet else weight_dtype


def _allow_fp16_gradients(scaler) -> None:
    """full_fp16: the gradients of fp16 network weights go through the loss scaler, which refuses to unscale fp16
    gradients unless told to (kohya's patch_accelerator_for_fp16_training)."""
    unscale = scaler._unscale_grads_

    def unscale_fp16_too(optimizer, inv_scale, found_inf, allow_fp16):
        return unscale(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_fp16_too


def _forget_other_precision(mixed_precision: str | None) -> None:
    """accelerate keeps one mixed precision per process and raises when a later Accelerator asks for another, so a
    second ``train()`` in the same process (a library caller, a benchmark) could not change it. In a single process,
    forget the previous run's state; processes started by a distributed launch keep theirs."""
    from accelerate.state import AcceleratorState, PartialState

    previous = AcceleratorState._shared_state.get("_mixed_precision")  # accelerate's own tests reset it this way
    if previous is None or str(previous) == str(mixed_precision or "no") or PartialState().num_processes != 1:
        return
    AcceleratorState._reset_state()


def _in_turn(accelerator, load):
    """``load()`` in one process of a machine at a time, as kohya loads models: several GPUs' processes reading
    the model at once need that many times the system RAM."""
    result = None
    for turn in range(accelerator.num_processes):
        if turn == accelerator.local_process_index:
            result = load()
        accelerator.wait_for_everyone()
    return result


def _warmup_steps(value, max_steps: int) -> int:
    if isinstance(value, str) and value.strip().endswith("%"):
        return int(float(value.strip()[:-1]) / 100 * max_steps)
    value = float(value or 0)
    return int(value * max_steps) if 0 < value < 1 else int(value)
