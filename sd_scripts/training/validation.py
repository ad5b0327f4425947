"""Validation loss: which images are held out, when to validate, and what a validation measures.

kohya-ss/sd-scripts' settings: ``validation_split`` (share of each training folder held out; 0 = off),
``validation_seed`` (default: ``seed``), ``validate_every_n_steps``, ``validate_every_n_epochs`` (default:
every epoch) and ``max_validation_steps`` (cap on validation batches).

* **The split** (``data/held_out.py``) is made per training folder (subset), never from regularization
  folders: the folder's images, sorted by path, are shuffled by a generator seeded from the validation seed
  and the folder's name, and the first ``floor(n * validation_split)`` are held out (kohya keeps
  ``ceil(n * (1 - split))`` for training, the same count). A folder too small to give one image keeps all
  of them. Held-out images are never trained on; the dataset plan lists them in ``validation_images``.
* **The measure** is comparable from one validation to the next: no gradients, every network in eval mode
  (no dropout), the schedule-free optimizers' evaluation weights, captions and crops without random
  augmentation, each batch evaluated at fixed timesteps (:func:`validation_timesteps`: :data:`VALIDATION_TIMESTEPS`
  unless min_timestep/max_timestep narrow the range) with Gaussian noise
  from a generator seeded by the validation seed and the batch index (no noise offset or input perturbation). The
  loss is the training's, as kohya's validation computes it (``loss_type``, alpha masks, the SNR weightings),
  averaged over images and timesteps. Nothing is
  drawn from the training random streams, so a run trains exactly the same LoRA with or without validations.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sd_scripts.core.config import TrainConfig


__all__ = ["VALIDATION_TIMESTEPS", "resolve_validation_seed",
           "validation_plan", "validation_due_at_step", "validation_due_at_epoch", "validation_timesteps",
           "batch_generator_seed"]

# kohya: linspace(min_timestep, max_timestep, 6)[1:-1] over the 1000 training timesteps
VALIDATION_TIMESTEPS = (200, 400, 600, 800)


def resolve_validation_seed(config: TrainConfig) -> int:
    """``validation_seed``, else ``seed``, else 0 (the split must not change from run to run)."""
    for value in (config.validation_seed, config.seed):
        if value is not None:
            return int(value)
    return 0


def validation_plan(plan: Any) -> Any | None:
    """A dataset plan of the held-out images (each once, captions and crops without random augmentation),
    for :class:`~.dataset.TrainDataset`; None when nothing is held out."""
    held = list(getattr(plan, "validation_images", None) or [])
    if not held:
        return None
    subsets = []
    for subset in plan.subsets:
        captions = dataclasses.replace(subset.captions, shuffle_caption=False, caption_dropout_rate=0.0,
                                       caption_dropout_every_n_epochs=0, caption_tag_dropout_rate=0.0,
                                       token_warmup_step=0)
        subsets.append(dataclasses.replace(subset, captions=captions, flip_aug=False, color_aug=False,
                                           random_crop=False))
    images = [dataclasses.replace(r, repeats=1) for r in held]
    return dataclasses.replace(plan, subsets=subsets, images=images, validation_images=[])


def validation_due_at_step(config: TrainConfig, step: int) -> bool:
    every = config.validate_every_n_steps
    return bool(every) and step % every == 0


def validation_due_at_epoch(config: TrainConfig, epoch: int) -> bool:
    every = config.validate_every_n_epochs
    return not every or epoch % every == 0


def validation_timesteps(config: Any, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    """kohya's ``linspace(min_timestep, max_timestep, 6)[1:-1]``: (200, 400, 600, 800) by default; the one
    timestep when min_timestep equals max_timestep."""
    # any object with the timestep settings (tests/test_validation.py passes a SimpleNamespace with some or none)
    low = getattr(config, "min_timestep", None)
    high = getattr(config, "max_timestep", None)
    low = 0 if low is None else int(low)
    high = num_train_timesteps if high is None else int(high)
    if high <= low:
        return (min(low, num_train_timesteps - 1),)
    steps = [low + (high - low) * i / 5 for i in range(1, 5)]
    return tuple(dict.fromkeys(min(int(round(t)), num_train_timesteps - 1) for t in steps))


def batch_generator_seed(seed: int, index: int) -> int:
    """The seed of validation batch ``index``'s noise: the same in every validation and on every process."""
    return (int(seed) * 1_000_003 + int(index)) % (2**63)
