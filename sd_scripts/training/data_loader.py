"""The training data loader: the dataset in index order (it shuffles itself), told each batch's optimizer step.

:func:`build_data_loader` gives the loader the loop iterates and the :class:`StepAwareDataset` view the loop
tells where each epoch starts (``step_base``).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

__all__ = ["StepAwareDataset", "build_data_loader", "loader_workers", "wants_token_warmup"]


class StepAwareDataset:
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


def wants_token_warmup(dataset_plan) -> bool:
    """Whether a subset warms its caption tokens up over the steps (``token_warmup_step``)."""
    return any((getattr(getattr(s, "captions", None), "token_warmup_step", 0) or 0) > 0
               for s in getattr(dataset_plan, "subsets", []))


def loader_workers(max_workers: int, items_in_memory: bool) -> int:
    """How many loader processes: none when every batch is read from memory (cached latents: a batch is a few
    tensor lookups, less work than sending it from a worker process, and a worker would take a CPU core from
    training); else ``max_workers``, at most one per CPU (kohya's cap). A batch's random choices come from its own
    generator (``dataset.batch_rng``), so the count never changes what is trained."""
    if items_in_memory:
        return 0
    return min(max_workers, os.cpu_count() or 1)


def build_data_loader(config, dataset, dataset_plan, max_train_steps: int, seed: int):
    """``(view, loader)``: batches of the dataset in index order, one dataset item (a whole batch) at a time."""
    import torch

    ga = config.gradient_accumulation_steps
    token_warmup = wants_token_warmup(dataset_plan)
    if not token_warmup:
        dataset.set_step(0, max_train_steps)
    view = StepAwareDataset(dataset, ga, max_train_steps, token_warmup)
    workers = loader_workers(config.max_data_loader_n_workers, getattr(dataset, "latents_cached", False))
    loader = torch.utils.data.DataLoader(
        view, batch_size=1, shuffle=False, collate_fn=_first, num_workers=workers,
        persistent_workers=config.persistent_data_loader_workers and workers > 0,
        # its own generator: starting an epoch must not draw from torch's global one (exact resume)
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_ignore_sigint,
    )
    return view, loader


def _ignore_sigint(worker_id: int) -> None:
    """Data loader workers leave Ctrl+C to the main process, which finishes the step and saves."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (ValueError, OSError):  # pragma: no cover
        pass


def _first(items):
    return items[0]
