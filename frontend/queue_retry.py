"""What a queue job changes when it is retried after running out of GPU memory.

A job that ends with a CUDA out-of-memory error (``torch.OutOfMemoryError``; the child exits with
:data:`EXIT_OUT_OF_MEMORY`) is retried once. The retry turns on the first of these memory savers
that the job does not use yet, going down the list only as far as needed to change something:

1. ``gradient_checkpointing``;
2. ``cache_latents`` and ``cache_text_encoder_outputs`` (each only where the job's other settings
   allow it: the engine's own checks decide, e.g. no random crops, a frozen text encoder);
3. ``batch_size`` halved (to its largest divisor up to half) with ``gradient_acc_steps`` raised so
   the effective batch (batch size x accumulation) stays the same.

Steps 1 and 2 change neither the data order nor the result's shape, so the retry continues from
the job's latest queue state when there is one; step 3 changes the batches, so it starts over. Any
other error is not retried. The summary says what changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["EXIT_OUT_OF_MEMORY", "MemoryRetry", "memory_retry"]

EXIT_OUT_OF_MEMORY = 3


@dataclass
class MemoryRetry:
    store: Any  # the job's settings for the retry
    change: str  # what changed, for the log and the summary
    keeps_batches: bool  # the data order is unchanged, so the retry may resume from the latest state


def _largest_divisor_up_to_half(n: int) -> int:
    return max(d for d in range(1, n // 2 + 1) if n % d == 0)


def memory_retry(store: Any, allowed: Callable[[Any], bool]) -> MemoryRetry | None:
    """The retry's settings, or None when every saver is on already. ``allowed(store)`` runs the
    checks a job gets before it starts and says whether the changed settings pass them."""
    if not store.gradient_checkpointing:
        changed = store.replace(gradient_checkpointing=True)
        if allowed(changed):
            return MemoryRetry(changed, "gradient_checkpointing on", True)
    turned_on = []
    for name in ("cache_latents", "cache_text_encoder_outputs"):
        if not getattr(store, name):
            changed = store.replace(**{name: True})
            if allowed(changed):
                store = changed
                turned_on.append(name)
    if turned_on:
        return MemoryRetry(store, " and ".join(turned_on) + " on", True)
    batch = int(store.batch_size or 1)
    if batch >= 2:
        smaller = _largest_divisor_up_to_half(batch)
        accumulate = int(store.gradient_acc_steps or 1)
        more = accumulate * batch // smaller
        changed = store.replace(batch_size=smaller, gradient_acc_steps=more)
        if allowed(changed):
            return MemoryRetry(changed, f"batch_size {batch} -> {smaller} with gradient_acc_steps {accumulate} -> "
                                        f"{more} (the same effective batch)", False)
    return None
