"""The FLUX.1 transformer (dev and schnell) in Black Forest Labs' layout.

``FluxTransformer(FluxParams)`` has exactly the parameter names of ``flux1-dev.safetensors``: ``img_in``, ``time_in``,
``vector_in``, ``guidance_in`` (dev only), ``txt_in``, ``double_blocks.N.*``, ``single_blocks.N.*`` and
``final_layer.*``. ``params_from_state_dict`` reads the sizes back from a checkpoint's shapes, so full-size files and
the tiny test model load through the same code.

The call is BFL's: packed image tokens ``img [B, L, 64]`` with their ``img_ids [B, L, 3]``, T5 states ``txt
[B, T, 4096]`` with ``txt_ids``, ``timesteps`` in [0, 1] (sigma), the pooled CLIP-L vector ``y [B, 768]`` and, for dev,
``guidance`` (the guidance scale, e.g. 3.5). ``blocks`` lists the transformer blocks in the order they run, for code
that moves blocks between devices (forward pre-hooks on the blocks fire on every call, checkpointed or not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from sd_scripts.models.checkpointing import checkpoint_blocks, uncheckpoint_blocks
from sd_scripts.models.flux.layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    timestep_embedding,
)

__all__ = ["FLUX_DEV_PARAMS", "FLUX_SCHNELL_PARAMS", "FluxParams", "FluxTransformer", "axes_dim_for",
           "params_from_state_dict", "strip_bfl_prefix", "BFL_PREFIX"]

BFL_PREFIX = "model.diffusion_model."


def axes_dim_for(head_dim: int) -> tuple[int, int, int]:
    """RoPE features per axis (index, row, column): FLUX.1's (16, 56, 56) for 128-wide heads, in proportion otherwise."""
    first = head_dim // 8
    rest = (head_dim - first) // 2
    return first, rest, rest


@dataclass(frozen=True)
class FluxParams:
    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = field(default=(16, 56, 56))
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


FLUX_DEV_PARAMS = FluxParams()
FLUX_SCHNELL_PARAMS = FluxParams(guidance_embed=False)


def strip_bfl_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The transformer's own keys of a BFL file saved with or without ComfyUI's ``model.diffusion_model.`` prefix."""
    if any(k.startswith(BFL_PREFIX) for k in state_dict):
        return {k[len(BFL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(BFL_PREFIX)}
    return dict(state_dict)


def _count_blocks(shapes: Mapping[str, object], head: str) -> int:
    indices = {int(k.split(".")[1]) for k in shapes if k.startswith(head + ".")}
    return max(indices) + 1 if indices else 0


def params_from_state_dict(shapes: Mapping[str, object]) -> FluxParams:
    """Sizes of the transformer whose (unprefixed) keys map to tensors or shapes."""
    def shape(key: str) -> tuple[int, ...]:
        value = shapes[key]
        return tuple(value.shape) if hasattr(value, "shape") else tuple(value)

    hidden, in_channels = shape("img_in.weight")
    head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0] if "double_blocks.0.img_attn.norm.query_norm.scale" in shapes \
        else shape("single_blocks.0.norm.query_norm.scale")[0]
    if "double_blocks.0.img_mlp.0.weight" in shapes:
        mlp_hidden = shape("double_blocks.0.img_mlp.0.weight")[0]
    else:
        mlp_hidden = shape("single_blocks.0.linear1.weight")[0] - 3 * hidden
    return FluxParams(
        in_channels=in_channels,
        out_channels=shape("final_layer.linear.weight")[0],
        vec_in_dim=shape("vector_in.in_layer.weight")[1],
        context_in_dim=shape("txt_in.weight")[1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=_count_blocks(shapes, "double_blocks"),
        depth_single_blocks=_count_blocks(shapes, "single_blocks"),
        axes_dim=axes_dim_for(head_dim),
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes if "double_blocks.0.img_attn.qkv.weight" in shapes else True,
        guidance_embed="guidance_in.in_layer.weight" in shapes,
    )


class FluxTransformer(nn.Module):
    """FLUX.1's flow-matching transformer (see the module doc for the call)."""

    def __init__(self, params: FluxParams = FLUX_DEV_PARAMS):
        super().__init__()
        if params.hidden_size % params.num_heads:
            raise ValueError(f"hidden size {params.hidden_size} is not a multiple of {params.num_heads} heads")
        if sum(params.axes_dim) != params.head_dim:
            raise ValueError(f"axes_dim {params.axes_dim} must add up to the head size {params.head_dim}")
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=params.head_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(params.in_channels, params.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=params.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, params.hidden_size)
        self.guidance_in = MLPEmbedder(in_dim=256, hidden_dim=params.hidden_size) if params.guidance_embed else None
        self.txt_in = nn.Linear(params.context_in_dim, params.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio)
            for _ in range(params.depth_single_blocks))
        self.final_layer = LastLayer(params.hidden_size, 1, params.out_channels)
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------------------------------------ facts

    @property
    def is_dev(self) -> bool:
        """True when the model embeds a guidance scale (FLUX.1 dev and its derivatives); schnell has none."""
        return self.params.guidance_embed

    @property
    def blocks(self) -> list[nn.Module]:
        """Every transformer block in the order the forward pass runs them: double-stream, then single-stream."""
        return [*self.double_blocks, *self.single_blocks]

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    def enable_gradient_checkpointing(self, cpu_offload: bool = False) -> None:
        """Checkpoint every block (``models/checkpointing.py``); ``cpu_offload``: kohya's
        ``cpu_offload_checkpointing``, the inputs each block keeps for the backward pass wait in CPU memory."""
        checkpoint_blocks(self.blocks, cpu_offload=cpu_offload)
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        uncheckpoint_blocks(self.blocks)
        self.gradient_checkpointing = False

    # ----------------------------------------------------------------------------------------------- forward

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                guidance: Tensor | None = None, txt_attention_mask: Tensor | None = None) -> Tensor:
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("img and txt must be [batch, tokens, features]")
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this FLUX.1 model (dev) needs a guidance scale")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe, txt_attention_mask)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, vec, pe, txt_attention_mask)
        return self.final_layer(x[:, txt.shape[1]:, ...], vec)
