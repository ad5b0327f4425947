"""Preflight: every check that can run before a model is loaded, all problems reported together.

``preflight(config)`` returns a :class:`Plan` (the scanned dataset, the detected model family,
warnings, a short summary of the dataset and the disk space needed) or raises :class:`UserErrors`
listing every problem found, each one line naming the setting and the fix. Nothing is written and
the dataset is only read. Every check records into one :class:`~sd_scripts.core.problems.Problems`.

What is checked, and where:

* settings alone (:mod:`.settings_checks`): declared ranges, choices and rules, CUDA-only options on a machine
  without CUDA, packages the settings need; the paths they name (:mod:`.paths`): output folder and name, inputs
  that must exist, the output folder outside the dataset;
* optimizer and scheduler settings (``optimizers.check_optimizer_settings``);
* noise and loss settings (``losses.check_noise_loss_settings``) and, once the model's prediction type is
  read, those that need epsilon or v prediction (``losses.prediction_type_problems``);
* the base model (family detected from a safetensors header or a diffusers folder's configs) and what is inside
  the files the settings name (:mod:`.model_files`): the CLIP tokenizer offline, ``network_weights``, ``vae``, the
  sample prompt file;
* the LoRA's metadata settings (``user_metadata.check_metadata_settings``: the thumbnail must be an image);
* the dataset (``dataset_layout.scan_dataset``): layout, captions, every image decoded once;
* the settings that depend on the model family, the network, resume state, sampling and logging;
* free disk space (:mod:`.disk_space`) for the LoRA files and training states (estimated from the
  model's layer shapes and ``network_dim``), the on-disk latent and text-encoder caches, sample images and logs.
"""

from __future__ import annotations

from sd_scripts.core.problems import Problems

from .disk_space import check_disk_space, estimate_lora_bytes, steps_and_epochs
from .model_files import check_sample_prompt_file, check_tokenizer_offline, check_weight_files
from .paths import check_output_outside_dataset
from .plan import DiskNeed, Plan, dataset_summary
from .settings_checks import check_settings

__all__ = ["Plan", "DiskNeed", "preflight", "check_settings", "check_disk_space", "estimate_lora_bytes",
           "dataset_summary"]


def preflight(config, model_given: bool = False) -> Plan:
    """Check everything that can be checked before the model loads; raise UserErrors on any problem."""
    from sd_scripts.data.dataset_layout import scan_dataset
    from sd_scripts.files.user_metadata import check_metadata_settings
    from sd_scripts.models.families import check_family_settings
    from sd_scripts.models.memory_settings import memory_setting_problems
    from sd_scripts.networks.factory import check_network_settings
    from sd_scripts.training.losses import check_noise_loss_settings
    from sd_scripts.training.loop_settings import check_loop_settings
    from sd_scripts.training.optimizers import check_optimizer_settings
    from sd_scripts.training.sampling import check_sampling_settings
    from sd_scripts.training.state import check_resume_settings

    problems = Problems()
    plan = Plan()
    check_settings(config, problems)
    check_noise_loss_settings(config, problems)
    check_metadata_settings(config, problems)
    with problems.collecting():
        check_optimizer_settings(config, problems)
    if not model_given:
        _check_model(config, plan, problems)
    check_weight_files(config, problems)
    if config.base_weights or config.base_weights_multiplier:
        from sd_scripts.networks.base_weights import check_base_weights

        check_base_weights(config, plan.family, problems)
    check_sample_prompt_file(config, problems)
    with problems.collecting():
        plan.dataset = scan_dataset(config)
        problems.extend(warnings=plan.dataset.warnings)
        plan.summary.extend(dataset_summary(plan.dataset))
    check_family_settings(config, plan.family, plan.dataset, plan.model_info, problems)
    memory_setting_problems(config, plan.family, plan.model_info, problems)
    with problems.collecting():
        check_network_settings(config, plan.family, problems, plan.model_info)
    check_output_outside_dataset(config, plan.dataset, problems)
    # resume state, sampler packages and logging: checked here so every front end reports them with the rest
    check_resume_settings(config, problems)
    check_sampling_settings(config, problems)
    check_loop_settings(config, problems)
    if not problems.errors:
        _, _, plan.disk = check_disk_space(config, plan, problems)
    plan.warnings = problems.warnings
    problems.raise_errors()
    if plan.dataset is not None:
        plan.steps = steps_and_epochs(config, plan.dataset)[0]
    return plan


def _check_model(config, plan: Plan, problems: Problems) -> None:
    """The base model's family (from a header or configs), its tokenizer offline, its prediction type's settings."""
    from sd_scripts.models.loading import detect_family
    from sd_scripts.training.losses import prediction_type_problems

    if not config.pretrained_model_name_or_path:
        problems.error("pretrained_model_name_or_path", "not set; give a .safetensors/.ckpt file or a diffusers folder")
        return
    with problems.collecting():
        plan.family, plan.model_info = detect_family(config)
        problems.warnings.extend(plan.model_info.get("warnings") or [])
        check_tokenizer_offline(config, plan.family, plan.model_info, problems)
        if "v_parameterization" in plan.model_info:  # else the loop checks them once the model is loaded
            prediction_type_problems(config, bool(plan.model_info["v_parameterization"]), problems)
        if plan.model_info.get("trained_zero_terminal_snr") and not config.zero_terminal_snr:
            problems.warn("zero_terminal_snr: the model was trained with zero terminal SNR (its files say so); turn "
                          "zero_terminal_snr on to train on the same noise schedule")
