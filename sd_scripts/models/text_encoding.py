"""Caption tokenization and CLIP text encoding, as kohya-ss/sd-scripts does it.

* ``max_token_length`` None/75 gives one 77-token chunk; 150/225 tokenize to 152/227 ids and split them into 2/3
  chunks of 77 (``BOS + 75 ids + EOS``), which are encoded as a batch and stitched back into 152/227 hidden states.
  Tokenizers whose pad differs from EOS (SD2's, pad "!" id 0) get kohya's per-chunk EOS fix-up.
* ``clip_skip`` k uses ``hidden_states[-k]`` followed by the final layer norm (A1111 semantics: 1 = last layer, the
  default output; 2 = penultimate). Works with transformers' flattened ``CLIPTextModel`` (no ``.text_model``).
* SDXL (``encode_tokens_with_pool``): a chosen hidden layer without the final norm (the penultimate for both SDXL
  text encoders) and, for an encoder with a ``text_projection``, the pooled output: the projected final state at
  the first EOS of each caption's first chunk (kohya's ``pool_workaround``).
* Weighted captions use A1111's syntax: ``(x)`` = x1.1, ``[x]`` = /1.1, ``(x:1.3)`` = x1.3, ``\\(`` for a literal
  bracket. Each token's hidden state is multiplied by its weight (no renormalisation, as in current kohya).
"""

from __future__ import annotations

from dataclasses import dataclass

from sd_scripts.core.errors import ConfigError

__all__ = [
    "ALLOWED_MAX_TOKEN_LENGTHS",
    "TokenizedPrompts",
    "check_clip_skip",
    "check_max_token_length",
    "chunk_ids",
    "count_prompt_tokens",
    "encode_tokens",
    "encode_tokens_with_pool",
    "final_layer_norm",
    "merge_chunk_states",
    "num_text_layers",
    "parse_prompt_attention",
    "text_tower",
    "tokenize_prompts",
    "tokenize_weighted",
]

ALLOWED_MAX_TOKEN_LENGTHS = (None, 75, 150, 225)
CHUNK = 77  # CLIP's context: BOS + 75 tokens + EOS
CHUNK_BODY = CHUNK - 2
WEIGHT_STEP = 1.1


@dataclass
class TokenizedPrompts:
    """Token ids ``[B, n, 77]`` (n = 1, 2 or 3 chunks) and, for weighted captions, per-id weights of the same shape."""

    input_ids: "torch.Tensor"  # noqa: F821
    weights: "torch.Tensor | None" = None  # noqa: F821

    @property
    def num_chunks(self) -> int:
        return int(self.input_ids.shape[1])


def check_max_token_length(max_token_length: int | None) -> None:
    if max_token_length not in ALLOWED_MAX_TOKEN_LENGTHS:
        raise ConfigError(f"max_token_length: {max_token_length!r} is not allowed; use 75, 150 or 225 (or leave it unset)")


def check_clip_skip(clip_skip: int | None, num_layers: int) -> None:
    if clip_skip is None:
        return
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 1 <= clip_skip <= num_layers:
        raise ConfigError(
            f"clip_skip: {clip_skip!r} is out of range for a text encoder with {num_layers} layers; use 1-{num_layers} "
            "(2 = penultimate layer, common for anime models)"
        )


# --------------------------------------------------------------------------------------------- weighted captions


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split an A1111-style prompt into ``(text, weight)`` pieces.

    ``(a)`` multiplies the weight of ``a`` by 1.1, ``[a]`` divides it by 1.1, ``(a:1.5)`` multiplies it by 1.5; brackets
    nest. ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal characters. Unclosed brackets apply to the rest of the
    prompt; a closing bracket without an opener is literal text. Neighbouring pieces of equal weight are merged.

    >>> parse_prompt_attention("a (red:1.5) [cat]")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('cat', 0.9090909090909091)]
    """
    pieces: list[list] = []  # [text, weight]
    round_open: list[int] = []  # index into pieces where each "(" started
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    def add_text(chunk: str) -> None:
        if chunk:
            pieces.append([chunk, 1.0])

    i, n = 0, len(text)
    literal = []
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n and text[i + 1] in "()[]\\":
            literal.append(text[i + 1])
            i += 2
            continue
        if ch in "()[]:":
            weight_end = _weight_suffix_end(text, i) if ch == ":" and round_open else None
            if ch == ":" and weight_end is None:
                literal.append(ch)
                i += 1
                continue
            add_text("".join(literal))
            literal = []
            if ch == "(":
                round_open.append(len(pieces))
            elif ch == "[":
                square_open.append(len(pieces))
            elif ch == ":":
                value_text = text[i + 1 : weight_end - 1].strip()
                scale(round_open.pop(), float(value_text))
                i = weight_end
                continue
            elif ch == ")" and round_open:
                scale(round_open.pop(), WEIGHT_STEP)
            elif ch == "]" and square_open:
                scale(square_open.pop(), 1 / WEIGHT_STEP)
            else:  # a closing bracket without an opener is text
                add_text(ch)
            i += 1
            continue
        literal.append(ch)
        i += 1
    add_text("".join(literal))
    for start in round_open:
        scale(start, WEIGHT_STEP)
    for start in square_open:
        scale(start, 1 / WEIGHT_STEP)

    if not pieces:
        return [("", 1.0)]
    merged: list[list] = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


def _weight_suffix_end(text: str, colon: int) -> int | None:
    """If ``text[colon:]`` starts with ``:<number>)`` (spaces allowed), return the index after the ``)``."""
    close = text.find(")", colon)
    if close < 0:
        return None
    value = text[colon + 1 : close].strip()
    try:
        float(value)
    except ValueError:
        return None
    if not value or any(c not in "+-.0123456789eE" for c in value):
        return None
    return close + 1


# ------------------------------------------------------------------------------------------------- tokenization


def _max_length(max_token_length: int | None) -> int:
    check_max_token_length(max_token_length)
    return CHUNK if max_token_length is None else max_token_length + 2


def chunk_ids(ids: list[int], bos: int, eos: int, pad: int) -> list[list[int]]:
    """Split one padded id list of length ``75*n + 2`` into n chunks of 77, as kohya does.

    Each chunk is ``[ids[0]] + ids[i:i+75] + [ids[-1]]`` for i = 1, 76, 151. When pad differs from EOS (SD2), a chunk
    whose last real position is a token gets EOS at the end, and an empty chunk becomes ``BOS EOS PAD ...``.
    """
    if len(ids) == CHUNK:
        return [list(ids)]
    chunks = []
    for i in range(1, len(ids) - CHUNK + 2, CHUNK_BODY):
        chunk = [ids[0]] + list(ids[i : i + CHUNK_BODY]) + [ids[-1]]
        if pad != eos:
            if chunk[-2] != eos and chunk[-2] != pad:
                chunk[-1] = eos
            if chunk[1] == pad:
                chunk[1] = eos
        chunks.append(chunk)
    return chunks


def _chunk_weights(weights: list[float]) -> list[list[float]]:
    if len(weights) == CHUNK:
        return [list(weights)]
    return [[1.0] + list(weights[i : i + CHUNK_BODY]) + [1.0] for i in range(1, len(weights) - CHUNK + 2, CHUNK_BODY)]


def _special_ids(tokenizer) -> tuple[int, int, int]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return bos, eos, pad


def tokenize_prompts(tokenizer, captions: list[str] | str, max_token_length: int | None = None,
                     weighted: bool = False) -> TokenizedPrompts:
    """Tokenize captions into ``[B, n, 77]`` ids (n = 1 for None/75, 2 for 150, 3 for 225).

    With ``weighted`` the captions are parsed for ``(x:1.2)``-style weights and ``weights`` has one weight per id
    (1.0 for BOS/EOS/padding); a caption without brackets tokenizes exactly as without ``weighted``.
    """
    import torch

    if isinstance(captions, str):
        captions = [captions]
    max_length = _max_length(max_token_length)
    bos, eos, pad = _special_ids(tokenizer)
    if weighted:
        rows = [tokenize_weighted(tokenizer, caption, max_length) for caption in captions]
        ids = [chunk_ids(r[0], bos, eos, pad) for r in rows]
        weights = [_chunk_weights(r[1]) for r in rows]
        return TokenizedPrompts(torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32))
    encoded = tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_length).input_ids
    ids = [chunk_ids(row, bos, eos, pad) for row in encoded]
    return TokenizedPrompts(torch.tensor(ids, dtype=torch.long))


def tokenize_weighted(tokenizer, caption: str, max_length: int = CHUNK) -> tuple[list[int], list[float]]:
    """Ids and per-id weights of one weighted caption: ``BOS + tokens[:max_length-2] + EOS`` padded to ``max_length``."""
    bos, eos, pad = _special_ids(tokenizer)
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in parse_prompt_attention(caption):
        if not text:
            continue
        piece = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
        ids += piece
        weights += [float(weight)] * len(piece)
    body = max_length - 2
    ids, weights = ids[:body], weights[:body]
    fill = body - len(ids)
    return [bos] + ids + [eos] + [pad] * fill, [1.0] + weights + [1.0] + [1.0] * fill


def count_prompt_tokens(tokenizer, caption: str, weighted: bool = True) -> int:
    """Number of tokens of a caption without BOS/EOS (used to choose the chunk count for sample prompts)."""
    if weighted:
        return sum(len(tokenizer(t, add_special_tokens=False, truncation=False).input_ids)
                   for t, _ in parse_prompt_attention(caption) if t)
    return len(tokenizer(caption, add_special_tokens=False, truncation=False).input_ids)


# ------------------------------------------------------------------------------------------------------ encoding


def text_tower(text_encoder):
    """The module holding ``embeddings/encoder/final_layer_norm`` (transformers >= 5.6 flattened ``CLIPTextModel``)."""
    return getattr(text_encoder, "text_model", text_encoder)


def final_layer_norm(text_encoder):
    return text_tower(text_encoder).final_layer_norm


def num_text_layers(text_encoder) -> int:
    return int(text_encoder.config.num_hidden_layers)


def merge_chunk_states(states, num_chunks: int):
    """``[B, n*77, D]`` chunk states -> ``[B, n*75+2, D]``: first BOS, each chunk's 75 body states, last EOS."""
    import torch

    if num_chunks == 1:
        return states
    parts = [states[:, :1]]
    for i in range(1, num_chunks * CHUNK, CHUNK):
        parts.append(states[:, i : i + CHUNK_BODY])
    parts.append(states[:, -1:])
    return torch.cat(parts, dim=1)


def encode_tokens(text_encoder, tokens: TokenizedPrompts, clip_skip: int | None = None):
    """Encode ``[B, n, 77]`` ids into ``[B, n*75+2, D]`` hidden states (77 for one chunk).

    Runs with gradients when the caller is in grad mode (training the text encoder LoRA).
    """
    check_clip_skip(clip_skip, num_text_layers(text_encoder))
    input_ids = tokens.input_ids
    batch, num_chunks, length = input_ids.shape
    device = next(text_encoder.parameters()).device
    flat_ids = input_ids.reshape(batch * num_chunks, length).to(device)
    if clip_skip is None or clip_skip == 1:
        states = text_encoder(flat_ids)[0]
    else:
        output = text_encoder(flat_ids, output_hidden_states=True)
        states = final_layer_norm(text_encoder)(output.hidden_states[-clip_skip])
    if tokens.weights is not None:
        weights = tokens.weights.reshape(batch * num_chunks, length, 1).to(device=states.device, dtype=states.dtype)
        states = states * weights
    states = states.reshape(batch, num_chunks * length, states.shape[-1])
    return merge_chunk_states(states, num_chunks)


def encode_tokens_with_pool(text_encoder, tokens: TokenizedPrompts, hidden_layer: int = -2,
                            eos_token_id: int | None = None):
    """``(states [B, n*75+2, D], pooled [B, P] or None)``: hidden layer ``hidden_layer`` (no final norm) of ``[B, n, 77]``
    ids, and with ``eos_token_id`` the pooled output ``text_projection(final_norm_state[first EOS])`` of chunk 0.

    ``hidden_layer`` indexes ``hidden_states`` (``-2`` = penultimate layer). Runs with gradients in grad mode.
    """
    import torch

    input_ids = tokens.input_ids
    batch, num_chunks, length = input_ids.shape
    device = next(text_encoder.parameters()).device
    flat_ids = input_ids.reshape(batch * num_chunks, length).to(device)
    output = text_encoder(flat_ids, output_hidden_states=True)
    states = output.hidden_states[hidden_layer]
    pooled = None
    if eos_token_id is not None:
        last = output.last_hidden_state
        eos = (flat_ids == eos_token_id).int().argmax(dim=-1)  # first EOS (0 when there is none)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]
        projection = getattr(text_encoder, "text_projection", None)
        if projection is not None:
            pooled = projection(pooled.to(projection.weight.dtype))
        pooled = pooled.reshape(batch, num_chunks, -1)[:, 0]
    if tokens.weights is not None:
        weights = tokens.weights.reshape(batch * num_chunks, length, 1).to(device=states.device, dtype=states.dtype)
        states = states * weights
    states = states.reshape(batch, num_chunks * length, states.shape[-1])
    return merge_chunk_states(states, num_chunks), pooled
