"""Which images of a training folder are held out for the validation loss (kohya's ``validation_split``)."""

from __future__ import annotations

import math
import random

__all__ = ["split_held_out"]


def split_held_out(records: list, fraction: float, seed: int, key: str) -> tuple[list, list]:
    """``(training, held_out)`` records of one folder; deterministic in (records, fraction, seed, key)."""
    if not fraction or not records:
        return list(records), []
    order = sorted(records, key=lambda r: r.path)
    random.Random(f"lets-validation/{seed}/{key}").shuffle(order)
    count = min(int(math.floor(len(order) * fraction + 1e-9)), len(order) - 1)
    held = {id(r) for r in order[:count]}
    return [r for r in records if id(r) not in held], [r for r in records if id(r) in held]
