"""Caption length in CLIP tokens, for the dataset report.

SD 1.x/2.x and SDXL read at most 75 tokens of a caption per 77-token chunk (BOS and EOS added);
``max_token_length`` 150 or 225 lets the training read 2 or 3 chunks, and anything past it is cut off.

:class:`TokenCounter` counts exactly with a CLIP tokenizer when one is given (the model's, found offline by
:func:`find_clip_tokenizer`), the way the training counts a prompt's tokens (``count_prompt_tokens``; with
``weighted_captions`` the ``(tag:1.2)`` brackets are not counted). Without one it estimates: CLIP's own
pre-tokenizer pieces (runs of letters, each digit, each run of punctuation: "1girl, long_hair" is 1 / girl /
, / long / _ / hair = 6), a run of letters counted as one token per 12 letters started. Common English words
and tags are one CLIP token each, so the estimate is close for tags and plain English; rare words and names
split into more tokens than estimated, so treat an estimate near a limit as over it.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from typing import Any

from sd_scripts.core.config import TrainConfig
from sd_scripts.data.captions import CaptionSettings, process_caption

__all__ = ["TOKEN_LIMITS", "TokenCounter", "caption_as_trained", "estimate_tokens", "find_clip_tokenizer"]

TOKEN_LIMITS = (75, 150, 225)
# CLIP's pre-tokenizer (openai/CLIP simple_tokenizer.py) with \p{L} / \p{N} written for the re module
_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)
_LETTERS_PER_TOKEN = 12


def estimate_tokens(text: str) -> int:
    """An estimate of the CLIP token count of ``text`` (see the module docstring)."""
    total = 0
    for piece in _PIECES.findall(text.lower()):
        if piece[0].isalpha():
            total += (len(piece) + _LETTERS_PER_TOKEN - 1) // _LETTERS_PER_TOKEN
        else:
            total += 1
    return total


class TokenCounter:
    """``count(caption)``: exact with a tokenizer, estimated without; ``exact`` says which."""

    def __init__(self, tokenizer: Any = None, weighted: bool = False):
        self.tokenizer = tokenizer
        self.weighted = weighted

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def count(self, caption: str) -> int:
        if not caption:
            return 0
        if self.tokenizer is None:
            return estimate_tokens(caption)
        from sd_scripts.models.text_encoding import count_prompt_tokens

        return count_prompt_tokens(self.tokenizer, caption, weighted=self.weighted)


def caption_as_trained(caption: str, settings: CaptionSettings) -> str:
    """The caption a training step reads, without its random parts: prefix and suffix added, the first line
    (or, with wildcards, one variant), every tag kept (no shuffling, dropout or token warm-up)."""
    fixed = dataclasses.replace(settings, shuffle_caption=False, caption_dropout_rate=0.0,
                                caption_dropout_every_n_epochs=0, caption_tag_dropout_rate=0.0, token_warmup_step=0)
    return process_caption(caption, fixed, random.Random(0))


def find_clip_tokenizer(config: TrainConfig) -> Any:
    """The CLIP tokenizer a training with ``config`` would use, when it can be found without a download (the base
    model's ``tokenizer/`` folder, ``tokenizer_cache_dir``, the Hugging Face cache); None otherwise."""
    from sd_scripts.core.errors import UserError
    from sd_scripts.models.families import get_family
    from sd_scripts.models.loading import load_tokenizer

    family = get_family("sdxl" if config.sdxl else "sd2" if config.v2 else "sd1")
    model = config.pretrained_model_name_or_path
    folder = model if model and os.path.isdir(model) else None
    try:
        return load_tokenizer(family, config, model_folder=folder, download=False)
    except UserError:
        return None
