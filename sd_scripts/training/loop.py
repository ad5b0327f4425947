"""The training loop: ``train(config, callbacks) -> TrainResult``.

Reads top to bottom: preflight, accelerator, models, dataset (and latent cache), network,
optimizer and schedule, the state to resume from, then one loop over epochs and batches.
Family-specific work (text encoding, the UNet call, latent scale) goes through the model family
object, so the loop never branches on a family name. Progress, samples and saves reach the caller
through callbacks; nothing here prints.

Reliability rules the loop keeps:

* **Exact resume.** ``save_state`` writes the network, optimizer, scheduler, random states, the
  counters and the position in the data order (:mod:`.train_state`). The data order depends only
  on (seed, epoch, batch index), so a resumed run skips the batches already trained on and
  continues bit for bit: a run stopped after a saved state and resumed ends with the same LoRA.
  The data loader has its own random generator, so starting an epoch draws nothing from torch's
  global generator, and sampling saves and restores every random state.
* **Several processes.** Every process is seeded with the run's seed while models, latents and
  network are built (same weights everywhere), and agrees on the data order; when training
  starts, each process but 0 switches to its own stream (``train_state.process_seed``), so the
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

import math
import os
import re
import signal
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sd_scripts.training.callbacks import CallbackDispatcher
from sd_scripts.core.errors import ConfigError, UserError
from sd_scripts.training.validation import validation_due_at_epoch, validation_due_at_step

__all__ = ["TrainResult", "TrainingStopped", "TrainingInterrupted", "train", "lora_file_name", "loss_plot_name"]


class TrainingStopped(UserError):
    """Training stopped on purpose (a non-finite loss or weights); the last good LoRA is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl+C: what could be saved was saved (``saved_files``); command lines exit with 130."""

    def __init__(self, message: str, saved_files: list[str], state_path: str | None = None):
        super().__init__(message)
        self.saved_files = saved_files
        self.state_path = state_path


class _StopAtOnce(KeyboardInterrupt):
    """The second Ctrl+C: leave without saving."""


@dataclass
class TrainResult:
    output_path: str | None
    saved_files: list[str] = field(default_factory=list)
    sample_files: list[str] = field(default_factory=list)
    state_paths: list[str] = field(default_factory=list)
    plot_path: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    global_step: int = 0
    epochs: int = 0
    losses: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    resumed_from: str | None = None
    validation_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)


def lora_file_name(output_name: str | None, ext: str, *, epoch: int | None = None, step: int | None = None) -> str:
    """kohya's names: ``name.ext``, ``name-000001.ext`` per epoch, ``name-step00000500.ext`` per step."""
    if epoch is not None:
        return f"{output_name or 'epoch'}-{epoch:06d}.{ext}"
    if step is not None:
        return f"{output_name or 'at'}-step{step:08d}.{ext}"
    return f"{output_name or 'last'}.{ext}"


def loss_plot_name(output_name: str | None) -> str:
    """The loss-and-learning-rate chart written beside the LoRA at the end of a run."""
    return f"{output_name or 'last'}-loss.png"


def _weight_dtype(mixed_precision: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _allow_fp16_gradients(scaler) -> None:
    """full_fp16: the gradients of fp16 network weights go through the loss scaler, which refuses to unscale fp16
    gradients unless told to (kohya's patch_accelerator_for_fp16_training)."""
    unscale = scaler._unscale_grads_

    def unscale_fp16_too(optimizer, inv_scale, found_inf, allow_fp16):
        return unscale(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_fp16_too


def _in_turn(accelerator, load):
    """``load()`` in one process of a machine at a time, as kohya loads models: several GPUs' processes reading
    the model at once need that many times the system RAM."""
    result = None
    for turn in range(accelerator.num_processes):
        if turn == accelerator.local_process_index:
            result = load()
        accelerator.wait_for_everyone()
    return result


def _frozen_dtypes(config, weight_dtype, device):
    """(UNet, text encoders) dtypes of the frozen weights while training: kohya's ``fp8_base`` stores both in
    float8 (e4m3) on CUDA, ``fp8_base_unet`` the UNet only; CUDA's autocast computes with them in the mixed
    precision. Elsewhere, and without these settings, the training precision."""
    import torch

    fp8 = bool(config.fp8_base or config.fp8_base_unet) and device.type == "cuda"
    unet = torch.float8_e4m3fn if fp8 else weight_dtype
    return unet, torch.float8_e4m3fn if fp8 and not config.fp8_base_unet else weight_dtype


def _base_dtypes(config, device):
    """(frozen weights, VAE) dtypes: the mixed precision on CUDA, float32 elsewhere; ``no_half_vae`` keeps the VAE
    in float32 (SDXL's VAE overflows in fp16)."""
    import torch

    weight_dtype = _weight_dtype(config.mixed_precision) if device.type == "cuda" else torch.float32
    return weight_dtype, torch.float32 if config.no_half_vae else weight_dtype


def _forget_other_precision(mixed_precision: str | None) -> None:
    """accelerate keeps one mixed precision per process and raises when a later Accelerator asks for another, so a
    second ``train()`` in the same process (a library caller, a benchmark) could not change it. In a single process,
    forget the previous run's state; processes started by a distributed launch keep theirs."""
    from accelerate.state import AcceleratorState, PartialState

    previous = AcceleratorState._shared_state.get("_mixed_precision")  # accelerate's own tests reset it this way
    if previous is None or str(previous) == str(mixed_precision or "no") or PartialState().num_processes != 1:
        return
    AcceleratorState._reset_state()


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


class _StopRequest:
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
            raise _StopAtOnce("stopped at once (second Ctrl+C); nothing more was saved")
        self.requested = True


class _StepAwareDataset:
    """The dataset as the data loader sees it. With token warm-up (the only thing that reads the
    step), the dataset is told the optimizer step each batch belongs to, computed from the batch's
    position in the epoch, so it depends neither on the loader's read-ahead nor on where a resumed
    run started. (With several loader workers they share that value, so a worker may see a
    neighbour's step: warm-up is then exact to within a few steps.)"""

    def __init__(self, dataset, grad_accum: int, max_steps: int, active: bool):
        import multiprocessing

        self.dataset = dataset
        self.grad_accum = grad_accum
        self.max_steps = max_steps
        self.active = active
        self._base = multiprocessing.RawValue("q", 0)  # read live by persistent loader workers

    @property
    def step_base(self) -> int:
        return int(self._base.value)

    @step_base.setter
    def step_base(self, value: int) -> None:
        self._base.value = int(value)

    def __getstate__(self) -> dict:
        from multiprocessing.context import get_spawning_popen

        state = self.__dict__.copy()
        if get_spawning_popen() is None:  # an ordinary pickle, not a worker start: freeze the value
            state["_base"] = _Frozen(self.step_base)
        return state

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if self.active:
            self.dataset.set_step(self.step_base + index // self.grad_accum, self.max_steps)
        return self.dataset[index]


@dataclass
class _Frozen:
    value: int


class _Trainer:
    def __init__(self, config, plan, cb, model=None):
        self.config = config
        self.plan = plan
        self.cb = cb
        self.preloaded_model = model
        self._prompt_cache: dict = {}
        self.result = TrainResult(output_path=None, warnings=list(plan.warnings))
        self._stop = _StopRequest()
        self._trackers_on = False
        self._last_lora: str | None = None
        self._last_state: str | None = None
        self._last_state_step: int | None = None
        self._last_sample_step = -1
        self._at_boundary = True  # weights, optimizer and counters agree (between optimizer steps)
        self._consistent = True  # weights are not half-updated

    # ----------------------------------------------------------------- setup
    def run(self) -> TrainResult:
        import torch
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from sd_scripts.networks.factory import build_network
        from sd_scripts.data.dataset import TrainDataset
        from sd_scripts.models.loading import load_model
        from sd_scripts.training.noise import make_noise_scheduler
        from sd_scripts.data.te_cache import build_text_encoder_cache, wants_text_encoder_cache
        from sd_scripts.training.state import TrainProgress, load_train_state, read_progress, recover_output_folder

        config = self.config
        resume_info = read_progress(config.resume) if config.resume else None
        if resume_info is not None:
            seed = int(resume_info.get("seed", 0))
            if config.seed is not None and int(config.seed) != seed:
                self._warn(f"resume: the state was trained with seed {seed}; continuing with it (not {config.seed})")
        else:
            seed = config.seed if config.seed is not None else int.from_bytes(os.urandom(4), "little") % (2**31)
        self.seed = seed
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
        device = accelerator.device
        self.weight_dtype, self.vae_dtype = weight_dtype, vae_dtype = _base_dtypes(config, device)
        if accelerator.is_main_process and config.output_dir:
            for line in recover_output_folder(config.output_dir, config.output_name):
                self.cb.on_message(f"cleaned up after an interrupted run: {line}")

        # frozen weights straight in the training precision: a float32 copy of SDXL alone is 13.5 GB of RAM
        model = self.preloaded_model if self.preloaded_model is not None else _in_turn(accelerator, lambda: load_model(
            config, dtype=weight_dtype, vae_dtype=vae_dtype,
            device=device if config.lowram and device.type == "cuda" else None))
        self.model = model
        family = model.family
        self.family = family
        if config.base_weights:  # kohya: merged into the base model before the network is built
            from sd_scripts.networks.base_weights import merge_base_weights

            for line in merge_base_weights(model, config.base_weights, config.base_weights_multiplier):
                self.cb.on_message(line)
        self.v_param = model.v_parameterization
        self._check_prediction_type()
        self.noise_scheduler = make_noise_scheduler(self.v_param, config.zero_terminal_snr)
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(device)

        # Frozen base models.
        for module in [model.unet, model.vae, *model.text_encoders]:
            module.requires_grad_(False)
        if config.xformers:
            model.unet.enable_xformers_memory_efficient_attention()
        model.vae.to(device, dtype=vae_dtype).eval()

        # Dataset and latent cache.
        plan = self.plan
        dataset = TrainDataset(plan.dataset, config, seed)
        self.dataset = dataset
        self.result.tag_frequency = dict(plan.dataset.tag_frequency)
        if config.cache_latents:
            self.cb.on_message("caching latents")
            dataset.cache_latents(self._encode_images, config.vae_batch_size, config.cache_latents_to_disk,
                                  self._vae_cache_key())
        self._prepare_validation()
        if config.cache_latents:
            if not config.sample_prompts:
                model.vae.to("cpu")

        # Network.
        train_unet = not config.network_train_text_encoder_only
        train_te = not config.network_train_unet_only
        self.train_te = train_te
        built_net = build_network(config, model, train_unet=train_unet, train_text_encoder=train_te)
        for w in built_net.warnings:
            self._warn(w)
        self.network = network = built_net.network
        if config.scale_weight_norms and not getattr(network, "supports_max_norm", lambda: True)():
            raise ConfigError("scale_weight_norms: this LyCORIS network has no max-norm regularization (LyCORIS has "
                              "it for LoCon, LoHa, LoKr and OFT); turn scale_weight_norms off or change algo",
                              "scale_weight_norms")
        # trainable weights in float32 whatever the base model's dtype; full_fp16/full_bf16 (kohya) put them in the
        # training precision too, for the memory
        full_half = (config.full_fp16 or config.full_bf16) and weight_dtype != torch.float32
        network.to(device, dtype=weight_dtype if full_half else torch.float32)
        if config.lowram and device.type != "cuda":
            self._warn("lowram: has no effect here (no CUDA device to load the model into)")
        if (config.full_fp16 or config.full_bf16) and not full_half:
            self._warn(f"{'full_fp16' if config.full_fp16 else 'full_bf16'}: has no effect here (no CUDA device: the "
                       "network trains in float32)")

        unet_dtype, te_dtype = _frozen_dtypes(config, weight_dtype, device)
        if (config.fp8_base or config.fp8_base_unet) and device.type != "cuda":
            self._warn(f"{'fp8_base' if config.fp8_base else 'fp8_base_unet'}: has no effect here (float8 weights "
                       "need a CUDA device)")
        model.unet.to(device, dtype=unet_dtype)
        for te in model.text_encoders:
            te.to(device, dtype=te_dtype)
            if te_dtype != weight_dtype:
                for module in te.modules():
                    if isinstance(module, torch.nn.Embedding):
                        module.to(dtype=weight_dtype)  # no float8 embedding lookup (kohya keeps them too)
        self.te_dtype = te_dtype
        self._te_cache_complete = False
        if not train_te and wants_text_encoder_cache(config):
            # cache_text_encoder_outputs: encode every caption once now, then free the text encoders' memory
            self.cb.on_message("caching text encoder outputs")
            key = f"{os.path.abspath(config.pretrained_model_name_or_path or model.model_path)}|{te_dtype}"
            cache = build_text_encoder_cache(config, plan.dataset, model, settings_key=key,
                                             context=self.accelerator.autocast)
            self._prompt_cache = cache.rows
            self._te_cache_complete = True
            for te in model.text_encoders:
                te.to("cpu")
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
        from sd_scripts.training.optimizers import build_lr_scheduler, build_optimizer, is_schedule_free

        params, self.group_names = network.prepare_optimizer_params(config.text_encoder_lr, config.unet_lr, config.learning_rate)
        if not params:
            raise ConfigError("learning_rate: every learning rate is 0, so nothing would train; set unet_lr or text_encoder_lr above 0")
        built = build_optimizer(config, params)
        optimizer, self.optimizer_name = built[0], built[1]
        for w in getattr(built, "warnings", []):
            self._warn(w)
        self.schedule_free = is_schedule_free(optimizer)
        self.trainable_params = [p for group in params for p in group["params"]]

        ga = config.gradient_accumulation_steps
        num_processes = accelerator.num_processes
        if config.max_train_epochs:
            max_train_steps = config.max_train_epochs * math.ceil(len(dataset) / num_processes / ga)
        else:
            max_train_steps = config.max_train_steps
        self.max_train_steps = max_train_steps
        token_warmup = any((getattr(getattr(s, "captions", None), "token_warmup_step", 0) or 0) > 0
                           for s in getattr(plan.dataset, "subsets", []))
        if not token_warmup:
            dataset.set_step(0, max_train_steps)
        self.loader_view = _StepAwareDataset(dataset, ga, max_train_steps, token_warmup)
        dataloader = torch.utils.data.DataLoader(
            self.loader_view, batch_size=1, shuffle=False, collate_fn=_first,
            num_workers=config.max_data_loader_n_workers,
            persistent_workers=config.persistent_data_loader_workers and config.max_data_loader_n_workers > 0,
            # its own generator: starting an epoch must not draw from torch's global one (exact resume)
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=_ignore_sigint,
        )
        sched_warnings: list[str] = []
        lr_scheduler = build_lr_scheduler(config, optimizer, max_train_steps, num_processes=num_processes,
                                          warnings=sched_warnings)
        for w in sched_warnings:
            self._warn(w)
        optimizer, dataloader, lr_scheduler = accelerator.prepare(optimizer, dataloader, lr_scheduler)
        if full_half and accelerator.scaler is not None:
            _allow_fp16_gradients(accelerator.scaler)
        self.optimizer, self.dataloader, self.lr_scheduler = optimizer, dataloader, lr_scheduler
        self.steps_per_epoch = math.ceil(len(dataloader) / ga)
        self.num_train_epochs = math.ceil(max_train_steps / self.steps_per_epoch)
        self.save_every_n_epochs = config.save_every_n_epochs
        if config.save_n_epoch_ratio:
            self.save_every_n_epochs = max(1, self.num_train_epochs // config.save_n_epoch_ratio)

        self._prepare_metadata(built_net, len(dataloader), num_processes)
        self._prepare_samples()
        if accelerator.is_main_process and (config.log_with or config.logging_dir):
            self._init_trackers()

        # Where to start: fresh, or the saved state.
        self.progress = TrainProgress(num_batches_per_epoch=len(dataloader), max_train_steps=max_train_steps, seed=seed,
                                      group_names=list(self.group_names))
        self.resumed_rng = None
        if config.resume:
            self._restore(load_train_state(config.resume))
        elif config.initial_step is not None or config.initial_epoch is not None:
            self._start_at_initial_step()
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
            "start_step": self.progress.global_step,
            **({"resumed_from": f"{config.resume} (step {self.progress.global_step})"} if config.resume else {}),
        })
        self._stop.install()
        try:
            self._loop()
        finally:
            self._stop.uninstall()
            if self._trackers_on:
                try:
                    accelerator.end_training()
                except Exception:  # noqa: BLE001 - closing logs must not hide the real outcome
                    pass
        self.cb.on_end(self.result)
        return self.result

    def _warn(self, text: str) -> None:
        self.result.warnings.append(text)
        self.cb.on_message(f"warning: {text}")

    def _log_with(self):
        if self.config.log_with:
            return self.config.log_with
        return "tensorboard" if self.config.logging_dir else None

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

    def _log(self, values: dict, step: int) -> None:
        if self._trackers_on:
            self.accelerator.log(values, step=step)

    def _vae_cache_key(self) -> str:
        src = self.config.vae or self.config.pretrained_model_name_or_path
        return f"{self.family.name}|{os.path.abspath(src)}|{self.vae_dtype}"

    def _encode_images(self, images, generator=None):
        import torch

        with torch.no_grad():
            images = images.to(self.accelerator.device, dtype=self.vae_dtype)
            return self.model.vae.encode(images).latent_dist.sample(generator=generator).float()

    def _prepare_metadata(self, built_net, num_batches, num_processes):
        from sd_scripts.files.lora_file import build_modelspec, file_sha256, legacy_model_hash
        from sd_scripts.files.metadata import build_training_metadata
        from sd_scripts.files.user_metadata import modelspec_title, user_modelspec

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
        res = [int(p) for p in str(self.config.resolution).split(",")]
        timesteps = None
        if self.config.min_timestep is not None or self.config.max_timestep is not None:  # kohya writes it only then
            high = self.config.max_timestep
            timesteps = (self.config.min_timestep or 0, 1000 if high is None else high)
        self.metadata.update(build_modelspec(
            self.family.modelspec_architecture(self.v_param), title=modelspec_title(self.config) or "LoRA",
            resolution=f"{res[0]}x{res[-1]}", prediction_type="v" if self.v_param else "epsilon",
            clip_skip=self.config.clip_skip, timestep_range=timesteps, extra=user_modelspec(self.config),
        ))
        self.result.metadata = self.metadata

    def _prepare_samples(self):
        self.sample_prompts = []
        if self.config.sample_prompts:
            from sd_scripts.training.sampling import load_sample_prompts

            self.sample_prompts = load_sample_prompts(self.config.sample_prompts)

    def _restore(self, state) -> None:
        """Put the saved network, optimizer, scheduler, counters and history in place."""
        from sd_scripts.training.state import saved_rng_of

        p = state.progress
        own = self.network.state_dict()
        missing = sorted(set(own) - set(state.network))
        unexpected = sorted(set(state.network) - set(own))
        wrong = [k for k in own if k in state.network and tuple(own[k].shape) != tuple(state.network[k].shape)]
        if missing or unexpected or wrong:
            example = (missing or unexpected or wrong)[0]
            raise ConfigError(f"resume: the network in {state.path} does not match these settings ({example}); resume "
                              "with the network settings of the run that saved it", "resume")
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

    # ------------------------------------------------------------------ loop
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
            if isinstance(e, (TrainingInterrupted, _StopAtOnce)):
                raise
            # an interrupt raised outside our handler (a callback, a non-main-thread caller): save what is safe
            self._interrupt()

    def _is_last_epoch(self, epoch: int) -> bool:
        return self.progress.global_step >= self.max_train_steps or epoch >= self.num_train_epochs

    def _run_epoch(self, epoch: int, skip: int) -> None:
        import torch

        config, p, accelerator = self.config, self.progress, self.accelerator
        p.epoch = epoch
        if skip == 0:
            p.batches_done, p.epoch_start_step, p.epoch_end_done = 0, p.global_step, False
        self.loader_view.step_base = p.epoch_start_step
        self.dataloader.set_epoch(epoch)  # accelerate passes it on to the dataset (1-based)
        loader = self.dataloader
        if skip:
            loader = accelerator.skip_first_batches(self.dataloader, skip)
            loader.set_epoch(epoch)
            accelerator.step = 0  # states are saved between optimizer steps
        micro_losses: list = []
        images = 0
        skip_step = False
        max_norm = None  # (keys scaled, mean norm, max norm) of the last scale_weight_norms pass
        t_last = time.perf_counter()
        for batch in loader:
            self._at_boundary = False
            p.batches_done += 1
            images += len(batch["captions"])
            with accelerator.accumulate(self.network):
                loss = self._step_loss(batch)
                if self._any_process(not bool(torch.isfinite(loss))):
                    self._nonfinite(f"loss became {float(loss.detach())}", batch)
                    skip_step = True
                else:
                    accelerator.backward(loss)
                    micro_losses.append(loss.detach())
                if accelerator.sync_gradients and not skip_step:
                    if accelerator.num_processes > 1:
                        self._all_reduce_grads()
                    if config.max_grad_norm:
                        norm = accelerator.clip_grad_norm_(self.trainable_params, config.max_grad_norm)
                        if (accelerator.scaler is None and norm is not None
                                and not bool(torch.isfinite(torch.as_tensor(norm)))):
                            self._nonfinite(f"the gradient norm became {float(norm)}", batch)
                            skip_step = True
                if not skip_step:
                    self._consistent = False
                    self.optimizer.step()
                    if config.scale_weight_norms and accelerator.sync_gradients:
                        max_norm = self.network.apply_max_norm_regularization(config.scale_weight_norms,
                                                                              accelerator.device)
                    self._consistent = True
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            # one optimizer step done (or skipped)
            p.global_step += 1
            step = p.global_step
            if skip_step:
                value = float("nan")
                self.result.skipped_steps.append(step)
            else:
                value = float(torch.stack(micro_losses).mean()) if micro_losses else float("nan")
            micro_losses, skip_step = [], False
            self._at_boundary = True
            lrs = self._current_lrs()
            p.losses.append(value)
            p.lrs.append(lrs)
            if math.isfinite(value):
                self.result.losses.append(value)
                self._recent.append(value)
            now = time.perf_counter()
            if max_norm is not None:
                self.cb.on_step_info(step, {"keys_scaled": max_norm[0], "average_key_norm": max_norm[1]})
            self.cb.on_progress(step, self.max_train_steps, value, lrs[0] if lrs else 0.0, epoch)
            if self._trackers_on:
                logs = {"loss/current": value,
                        "loss/average": sum(self._recent) / len(self._recent) if self._recent else value,
                        "images_per_second": images * accelerator.num_processes / max(now - t_last, 1e-9),
                        "epoch": epoch}
                for name, group_lr in zip(self.group_names, lrs):
                    logs[f"lr/{name}"] = group_lr
                logs.update(self._lr_free_logs())
                if max_norm is not None:  # kohya's names
                    logs.update({"max_norm/keys_scaled": max_norm[0], "max_norm/average_key_norm": max_norm[1],
                                 "max_norm/max_key_norm": max_norm[2]})
                self._log(logs, step)
            if self.val_dataset is not None and validation_due_at_step(config, step):
                self._validate("step")
            if config.save_every_n_steps and step % config.save_every_n_steps == 0 and step < self.max_train_steps:
                self._save_checkpoint(step=step)
            if self._sampling_by_steps() and step % config.sample_every_n_steps == 0:
                self._sample(label=f"{step:06d}", step=step)
            self._state_if_due(step)
            self._check_stop()
            images, t_last, max_norm = 0, time.perf_counter(), None
            if step >= self.max_train_steps:
                break
        self.result.epochs = epoch

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
            self._save_state(_state_name(config.output_name))
        self._write_plot()
        if self.sample_prompts and self._last_sample_step != p.global_step:
            self._sample(label=f"e{p.epoch:06d}", step=p.global_step)

    def _sampling_by_steps(self) -> bool:
        # kohya: sample_every_n_epochs takes precedence over sample_every_n_steps
        return bool(self.config.sample_every_n_steps) and not self.config.sample_every_n_epochs

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

    def _check_prediction_type(self) -> None:
        """Settings that depend on epsilon or v prediction; preflight checks them when it can read the model."""
        from sd_scripts.core.errors import UserErrors
        from sd_scripts.training.losses import prediction_type_problems

        errors, warnings = prediction_type_problems(self.config, self.v_param)
        if errors:
            raise errors[0] if len(errors) == 1 else UserErrors(errors)
        if "v_parameterization" not in self.plan.model_info:  # preflight could not warn
            for w in warnings:
                self._warn(w)

    def _step_loss(self, batch):
        import torch

        from sd_scripts.training.noise import add_noise, perturb_noise, sample_noise, sample_timesteps, velocity_target

        config, device = self.config, self.accelerator.device
        with torch.no_grad():
            if batch.get("latents") is not None:
                latents = batch["latents"].to(device)
            else:
                latents = self._encode_images(batch["images"])
            latents = (latents * self.family.latent_scale).to(self.weight_dtype)
        cond = self._encode_prompts(batch["captions"])
        noise = sample_noise(latents, config.noise_offset, config.multires_noise_iterations, config.multires_noise_discount,
                             random_strength=config.noise_offset_random_strength,
                             adaptive_noise_scale=config.adaptive_noise_scale)
        timesteps = sample_timesteps(latents.shape[0], device, min_timestep=config.min_timestep,
                                     max_timestep=config.max_timestep)
        # input perturbation (ip_noise_gamma) noises the latents with more than the target noise
        noisy = add_noise(self.alphas_cumprod, latents,
                          perturb_noise(noise, config.ip_noise_gamma, config.ip_noise_gamma_random_strength), timesteps)
        with self.accelerator.autocast():
            pred = self.family.predict(self.model, noisy, timesteps, cond, batch)
        target = velocity_target(self.alphas_cumprod, latents, noise, timesteps) if self.v_param else noise
        return self._per_sample_loss(pred, target, timesteps, batch).mean()

    def _per_sample_loss(self, pred, target, timesteps, batch):
        """kohya's loss of a batch, per sample: ``loss_type`` (Huber threshold per timestep), alpha masks, the
        images' loss weights (prior_loss_weight) and the SNR weightings; training and validation share it."""
        from sd_scripts.training.losses import huber_c_for, loss_weights_for, per_sample_loss
        from sd_scripts.training.noise import snr_of

        config = self.config
        huber_c = huber_c_for(config, timesteps, self.alphas_cumprod)
        loss = per_sample_loss(pred, target, config.loss_type, huber_c, batch.get("alpha_masks"))
        loss = loss * batch["loss_weights"].to(loss.device)
        weights = loss_weights_for(config, snr_of(self.alphas_cumprod, timesteps), self.v_param)
        if weights is not None:
            loss = loss * weights
        return loss

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

    def _all_reduce_grads(self):
        for p in self.trainable_params:
            if p.grad is not None:
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    def _any_process(self, flag: bool) -> bool:
        """``flag`` on any process (all processes must call this together)."""
        if self.accelerator.num_processes == 1:
            return flag
        import torch

        t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

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

    def _check_finite_weights(self, what: str) -> None:
        import torch

        for name, tensor in self.network.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                kept = f"the last saved LoRA is kept: {self._last_lora}" if self._last_lora else "no LoRA was saved"
                raise TrainingStopped(
                    f"the network weights hold NaN/inf at step {self.progress.global_step} ({name}); the {what} was not "
                    f"saved; lower learning_rate (or use mixed_precision bf16 instead of fp16); {kept}", "learning_rate")

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
                    self._save_state(_state_name(config.output_name, step=p.global_step))
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

    # ------------------------------------------------------------ save/sample
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
            self._save_state(_state_name(config.output_name, step=step, epoch=epoch))
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
        state_name = re.escape(config.output_name or "last")
        ext = re.escape(config.save_model_as)
        try:
            entries = list(os.scandir(config.output_dir))
        except OSError:
            return
        for entry in entries:
            for keep, pattern, is_dir in ((keep_files, file_re.format(name=name, ext=ext), False),
                                          (keep_states, state_re.format(name=state_name), True)):
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
        from .state import DiskFullError

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

    # ------------------------------------------------------------ validation
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

        from sd_scripts.training.noise import add_noise, velocity_target
        from sd_scripts.training.validation import batch_generator_seed, validation_timesteps

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
                    batch = self.val_dataset[index]
                    generator = torch.Generator().manual_seed(batch_generator_seed(self.validation_seed, index))
                    if batch.get("latents") is not None:
                        latents = batch["latents"].to(device)
                    else:
                        latents = self._encode_images(batch["images"], generator)
                    latents = (latents * self.family.latent_scale).to(self.weight_dtype)
                    cond = self._encode_prompts(batch["captions"])
                    for t in validation_timesteps(self.config):
                        timesteps = torch.full((latents.shape[0],), t, dtype=torch.long, device=device)
                        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
                        noisy = add_noise(self.alphas_cumprod, latents, noise, timesteps)
                        with accelerator.autocast():
                            pred = self.family.predict(self.model, noisy, timesteps, cond, batch)
                        target = velocity_target(self.alphas_cumprod, latents, noise, timesteps) if self.v_param else noise
                        losses = self._per_sample_loss(pred, target, timesteps, batch)
                        total[0] += losses.double().sum()
                        total[1] += losses.numel()
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        if accelerator.num_processes > 1:
            total = accelerator.reduce(total, reduction="sum")
        return float(total[0] / total[1]) if float(total[1]) else float("nan")

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


_STEP_FILE = r"{name}-step(\d{{8}})\.{ext}"
_EPOCH_FILE = r"{name}-(\d{{6}})\.{ext}"
_STEP_STATE = r"{name}-step(\d{{8}})-state"
_EPOCH_STATE = r"{name}-(\d{{6}})-state"


def _state_name(output_name, *, step=None, epoch=None) -> str:
    from sd_scripts.training.state import state_dir_name

    return state_dir_name(output_name, step=step, epoch=epoch)


def _ignore_sigint(worker_id: int) -> None:
    """Data loader workers leave Ctrl+C to the main process, which finishes the step and saves."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (ValueError, OSError):  # pragma: no cover
        pass


def _first(items):
    return items[0]


def _warmup_steps(value, max_steps: int) -> int:
    if isinstance(value, str) and value.strip().endswith("%"):
        return int(float(value.strip()[:-1]) / 100 * max_steps)
    value = float(value or 0)
    return int(value * max_steps) if 0 < value < 1 else int(value)
