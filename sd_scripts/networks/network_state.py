"""LoRA/LyCORIS state dicts as per-module records: detect each module's algorithm, give its
delta weight or low-rank form (or, for DoRA, GLoRA and OFT/BOFT, its merged weight given the base
weight), and write LoRA/LoCon modules back in kohya's layout.

The middle layer of the LoRA tools: keys and shapes here, the tensor math in
:mod:`sd_scripts.networks.lora_math`, the files in the tools' ``*_file`` functions.
Key names and their grouping come from :mod:`sd_scripts.files.lora_keys`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from sd_scripts.core.errors import ConfigError
from sd_scripts.networks import lora_math as lm
from sd_scripts.files.lora_keys import group_by_module

__all__ = [
    "ALGO_PARTS",
    "NetModule",
    "is_3x3_conv_name",
    "lora_module_state",
    "parse_network",
    "unify_alpha",
]

# Parts (key suffix after "<name>.") each algorithm may have; "alpha", "scale" are shared.
ALGO_PARTS = {
    "lora": {"lora_down.weight", "lora_up.weight", "lora_mid.weight"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
    "ia3": {"weight", "on_input"},
    "full": {"diff", "diff_b"},
    "norm": {"w_norm", "b_norm"},
    "glora": {"a1.weight", "a2.weight", "b1.weight", "b2.weight"},
    "oft": {"oft_blocks", "rescale"},
    "boft": {"oft_blocks", "rescale"},
}
_SHARED_PARTS = {"alpha", "scale"}
# DoRA's magnitude rides on these algorithms (LyCORIS dora_wd: DoRA, DoHa, DoKr).
_DORA_ALGOS = ("lora", "loha", "lokr")
# What only a merge into the base weights handles (``parse_network(..., with_base=True)``).
_NEEDS_BASE = {
    "dora_scale": "DoRA (dora_scale)",
    "oft_blocks": "OFT/BOFT",
    "rescale": "OFT rescale",
    "a1.weight": "GLoRA",
}

# Parts of LyCORIS algorithms these tools do not handle, with the name to report.
_UNSUPPORTED = {
    "dora_scale": "DoRA (dora_scale)",
    "oft_blocks": "OFT/BOFT",
    "oft_diag": "OFT (LyCORIS 2.0)",
    "rescale": "OFT rescale",
    "a1.weight": "GLoRA",
    "lambda_layer": "T-LoRA",
    "bias_indices": "LoCon sparse bias (use_sparse_bias)",
}
# ... and what even the merge into the base weights does not.
_NOT_MERGEABLE = {
    "oft_diag": "OFT (LyCORIS 2.0)",
    "bm.weight": "Tucker GLoRA (bm.weight)",
    "lambda_layer": "T-LoRA",
    "bias_indices": "LoCon sparse bias (use_sparse_bias)",
}

# kohya/LDM/SGM module names of k x k convolutions in SD UNets (their flattened LoHa/LoKr factors
# do not tell the kernel size).
_CONV3_NAME = re.compile(
    r"(_conv1|_conv2|_conv|_conv_in|_conv_out|_in_layers_2|_out_layers_3|_op|input_blocks_0_0|_out_2)$"
)
_CONV1_NAME = re.compile(r"(_conv_shortcut|_skip_connection)$")
_PROJ_NAME = re.compile(r"(_proj_in|_proj_out)$")


def is_3x3_conv_name(name: str) -> bool:
    """True for the module names of SD UNets' 3x3 convolutions (resnet convs, down/upsamplers)."""
    return bool(_CONV3_NAME.search(name))


@dataclass
class NetModule:
    """One module of a LoRA/LyCORIS network: its algorithm and tensors (``parts`` keyed by suffix)."""

    name: str
    algo: str
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    v2: bool = False  # SD2 file: decides 2-D vs 1x1-conv layout of proj_in/out when converting

    def t(self, part: str) -> torch.Tensor | None:
        value = self.parts.get(part)
        return None if value is None else value.float()

    # ---- rank and scale

    @property
    def rank(self) -> int:
        """The algorithm's ``r`` (the ``alpha / r`` denominator); 0 for IA3/full/norm."""
        p = self.parts
        if self.algo == "lora":
            return int(p["lora_down.weight"].shape[0])
        if self.algo == "loha":
            return int(p["hada_w1_b"].shape[0])
        if self.algo == "lokr":
            if "lokr_w2_b" in p:
                return int(p["lokr_w2_b"].shape[0])
            if "lokr_w1_b" in p:
                return int(p["lokr_w1_b"].shape[0])
        if self.algo == "glora":
            return int(p["a2.weight"].shape[0])
        return 0

    @property
    def alpha(self) -> float | None:
        value = self.parts.get("alpha")
        return None if value is None else float(value.float().reshape(-1)[0])

    @property
    def scale(self) -> float:
        """The factor applied to the rebuilt product: an A1111 ``scale`` key wins, then ``alpha / r``.
        A LoKr with both Kronecker factors full has scale 1 whatever alpha says."""
        if "scale" in self.parts:
            return float(self.parts["scale"].float().reshape(-1)[0])
        if self.algo in ("lora", "loha", "glora"):
            return lm.lora_scale(self.alpha, self.rank)
        if self.algo == "lokr":
            r = self.rank
            return 1.0 if r == 0 else lm.lora_scale(self.alpha, r)
        return 1.0

    @property
    def has_low_rank_form(self) -> bool:
        return self.algo in ("lora", "loha", "lokr", "full") and not self.is_dora

    @property
    def is_dora(self) -> bool:
        """A LoRA/LoHa/LoKr module trained with DoRA (LyCORIS ``dora_wd``): its ``dora_scale`` magnitude
        applies to the merged weight, so it is merged with :meth:`merged_weight`."""
        return "dora_scale" in self.parts

    @property
    def transforms_base(self) -> bool:
        """True when the merged weight is not ``W + m * delta`` (DoRA, OFT, BOFT): see :meth:`merged_weight`."""
        return self.is_dora or self.algo in ("oft", "boft")

    @property
    def out_size(self) -> int:
        """The output size of the weight this module modifies."""
        if self.algo == "oft":
            return int(self.parts["oft_blocks"].shape[0] * self.parts["oft_blocks"].shape[1])
        if self.algo == "boft":
            return int(self.parts["oft_blocks"].shape[1] * self.parts["oft_blocks"].shape[2])
        if self.algo == "ia3":
            raise ValueError(f"{self.name}: ia3 modules have no shape of their own")
        return int(self.weight_shape()[0])

    # ---- shapes

    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the weight this module modifies, from its own tensors (and its name, for
        the flattened LoHa/LoKr factors, whose kernel size is not stored)."""
        p = self.parts
        if self.algo == "lora":
            return lm.lora_weight_shape(p["lora_down.weight"], p["lora_up.weight"], p.get("lora_mid.weight"))
        if self.algo == "full":
            return tuple(int(s) for s in p["diff"].shape)
        if self.algo == "norm":
            return tuple(int(s) for s in p["w_norm"].shape)
        if self.algo == "glora":
            return lm.lora_weight_shape(p["b2.weight"], p["b1.weight"])
        if self.algo == "loha":
            if "hada_t1" in p:
                return (int(p["hada_w1_a"].shape[1]), int(p["hada_w1_b"].shape[1])) + lm.kernel_of(p["hada_t1"].shape)
            out, n = int(p["hada_w1_a"].shape[0]), int(p["hada_w1_b"].reshape(p["hada_w1_b"].shape[0], -1).shape[1])
            return self._unflatten(out, n)
        if self.algo == "lokr":
            m1, m2 = lm.lokr_matrices(*self._lokr_args(meta_only=True))
            out = m1.shape[0] * m2.shape[0]
            if m2.dim() == 4:
                return (out, m1.shape[1] * m2.shape[1]) + lm.kernel_of(m2.shape)
            return self._unflatten(out, m1.shape[1] * m2.shape[1])
        raise ValueError(f"{self.name}: {self.algo} modules have no shape of their own")

    def _unflatten(self, out: int, n: int) -> tuple[int, ...]:
        if is_3x3_conv_name(self.name) and n % 9 == 0:
            return (out, n // 9, 3, 3)
        if _CONV1_NAME.search(self.name) or (_PROJ_NAME.search(self.name) and not self.v2):
            return (out, n, 1, 1)
        return (out, n)

    def _lokr_args(self, meta_only: bool = False):
        p = self.parts
        get = (lambda k: None if p.get(k) is None else torch.empty(p[k].shape, device="meta")) if meta_only else self.t
        return (get("lokr_w1"), get("lokr_w1_a"), get("lokr_w1_b"), get("lokr_w2"), get("lokr_w2_a"),
                get("lokr_w2_b"), get("lokr_t2"))

    def _loha_args(self):
        return (self.t("hada_w1_a"), self.t("hada_w1_b"), self.t("hada_w2_a"), self.t("hada_w2_b"),
                self.t("hada_t1"), self.t("hada_t2"))

    # ---- delta and low-rank form

    def rank_bound(self) -> int:
        """An upper bound of the rank of the module's delta (the rank of its low-rank form)."""
        shape = self.weight_shape()
        full = min(shape[0], int(torch.tensor(shape[1:]).prod()))
        p = self.parts
        if self.algo == "lora":
            return min(self.rank, full)
        if self.algo == "loha":
            return min(int(p["hada_w1_b"].shape[0]) * int(p["hada_w2_b"].shape[0]), full)
        if self.algo == "lokr":
            m1, m2 = lm.lokr_matrices(*self._lokr_args(meta_only=True))
            r1 = int(p["lokr_w1_b"].shape[0]) if "lokr_w1_b" in p else min(m1.shape)
            m2f = m2.reshape(m2.shape[0], -1)
            r2 = int(p["lokr_w2_b"].shape[0]) if "lokr_w2_b" in p else min(m2f.shape)
            return min(r1 * r2, full)
        return full

    def updown(self, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's delta as ``(U (out, R), D (R, n))``, ``delta = U @ D`` (times ``scale`` unless
        ``scaled`` is False) on the flattened ``(out, in*k*k)`` weight, in float32."""
        if self.algo == "lora":
            u, d = lm.lora_updown(self.t("lora_down.weight"), self.t("lora_up.weight"), self.t("lora_mid.weight"))
        elif self.algo == "loha":
            u, d = lm.loha_updown(*self._loha_args())
        elif self.algo == "lokr":
            u, d = lm.lokr_updown(*self._lokr_args())
        elif self.algo == "full":
            diff = self.t("diff")
            u, d = lm.matrix_updown(diff.reshape(diff.shape[0], -1))
        else:
            raise ValueError(f"{self.name}: {self.algo} modules have no low-rank form")
        return (u * self.scale, d) if scaled else (u, d)

    def delta(self, shape=None) -> torch.Tensor:
        """The module's delta weight (``scale`` applied, no multiplier) in ``shape`` (default: its own)."""
        shape = tuple(shape) if shape is not None else self.weight_shape()
        if self.algo == "lora":
            return lm.lora_delta(self.t("lora_down.weight"), self.t("lora_up.weight"), self.t("lora_mid.weight"),
                                 self.scale, shape)
        if self.algo == "loha":
            return lm.loha_delta(*self._loha_args(), scale=self.scale, shape=shape)
        if self.algo == "lokr":
            return lm.lokr_delta(*self._lokr_args(), scale=self.scale, shape=shape)
        if self.algo == "full":
            return lm.full_delta(self.t("diff"), shape)
        raise ValueError(f"{self.name}: the delta of a {self.algo} module depends on the base weight")

    def base_delta(self, base: torch.Tensor) -> torch.Tensor:
        """The delta (``scale`` applied, no multiplier) of a module whose delta depends on the base weight
        ``base`` (IA3, GLoRA), in ``base``'s shape: ``W' = W + m * delta``."""
        if self.algo == "ia3":
            on_input = bool(int(self.parts["on_input"].reshape(-1)[0])) if "on_input" in self.parts else False
            return lm.ia3_delta(base.float(), self.t("weight"), on_input)
        if self.algo == "glora":
            return lm.glora_delta(base, self.t("a1.weight"), self.t("a2.weight"), self.t("b1.weight"),
                                  self.t("b2.weight"), self.scale)
        return self.delta(base.shape)

    def merged_weight(self, base: torch.Tensor, ratio: float = 1.0) -> torch.Tensor:
        """``W'`` for the base weight ``base`` at multiplier ``ratio``, in float32 and ``base``'s shape, as
        LyCORIS' ``get_merged_weight(ratio)`` computes it:

        * DoRA: ``W'' = W + delta`` (delta without the multiplier), then ``W'' * (m (dora_scale / ||W''|| - 1) + 1)``;
        * OFT / BOFT: ``W`` rotated by the Cayley rotations interpolated with ``I``, then ``rescale``; the
          constraint is the file's alpha times the output size;
        * every other algorithm: ``W + m * delta``.
        """
        w = base.float()
        if self.is_dora:
            return lm.dora_weight(w + self.delta(w.shape), self.t("dora_scale"), ratio)
        if self.algo in ("oft", "boft"):
            constraint = (self.alpha or 0.0) * w.shape[0]
            fn = lm.oft_weight if self.algo == "oft" else lm.boft_weight
            return fn(w, self.t("oft_blocks"), constraint, self.t("rescale"), ratio)
        return w + ratio * self.base_delta(w)

    def to(self, device) -> NetModule:
        return NetModule(self.name, self.algo, {k: v.to(device) for k, v in self.parts.items()}, self.v2)


def _detect_algo(name: str, parts: Mapping[str, torch.Tensor], source: str, with_base: bool = False) -> str:
    for part, what in (_NOT_MERGEABLE if with_base else _UNSUPPORTED).items():
        if part in parts:
            hint = "" if with_base or part not in _NEEDS_BASE else "; merge it into a checkpoint instead"
            raise ConfigError(f"{source}: module {name} is {what}, which these tools do not handle yet{hint}")
    if "lora_up.weight" in parts:
        algo = "lora"
    elif "hada_w1_a" in parts:
        algo = "loha"
    elif "on_input" in parts:
        algo = "ia3"
    elif "lokr_w1" in parts or "lokr_w1_a" in parts:
        algo = "lokr"
    elif "diff" in parts:
        algo = "full"
    elif "w_norm" in parts:
        algo = "norm"
    elif "oft_blocks" in parts and parts["oft_blocks"].dim() in (3, 4):
        algo = "oft" if parts["oft_blocks"].dim() == 3 else "boft"
    elif "a1.weight" in parts:
        algo = "glora"
    elif "rescale" in parts:
        raise ConfigError(f"{source}: module {name} has an OFT rescale without oft_blocks; the file is incomplete")
    else:
        raise ConfigError(f"{source}: module {name} has an unknown key layout ({', '.join(sorted(parts))})")
    extra = set(parts) - ALGO_PARTS[algo] - _SHARED_PARTS - ({"dora_scale"} if algo in _DORA_ALGOS else set())
    if extra:
        raise ConfigError(f"{source}: module {name} mixes {algo} keys with unknown ones ({', '.join(sorted(extra))})")
    required = {
        "lora": {"lora_down.weight"},
        "loha": {"hada_w1_b", "hada_w2_a", "hada_w2_b"},
        "lokr": set(),
        "ia3": {"weight"},
        "full": set(),
        "norm": set(),
        "glora": {"a2.weight", "b1.weight", "b2.weight"},
        "oft": set(),
        "boft": set(),
    }[algo]
    missing = required - set(parts)
    if algo == "lokr" and not ({"lokr_w2"} <= set(parts) or {"lokr_w2_a", "lokr_w2_b"} <= set(parts)):
        missing = {"lokr_w2"}
    if algo == "lokr" and "lokr_w1_a" in parts and "lokr_w1_b" not in parts:
        missing = {"lokr_w1_b"}
    if missing:
        raise ConfigError(f"{source}: module {name} is an incomplete {algo} module (missing {', '.join(sorted(missing))})")
    return algo


def parse_network(state_dict: Mapping[str, torch.Tensor], source: str = "LoRA file",
                  metadata: Mapping[str, str] | None = None, with_base: bool = False) -> dict[str, NetModule]:
    """Group a kohya LoRA / LyCORIS (kohya-prefixed) state dict into :class:`NetModule` records.

    ``with_base`` is for the callers that merge into base weights (checkpoint merge, ``base_weights``):
    they also take DoRA, GLoRA and OFT/BOFT modules (see :meth:`NetModule.merged_weight`); the
    LoRA-to-LoRA tools do not. Raises ConfigError naming ``source`` for a file that is not a LoRA (no
    module keys), an unknown key layout, or an algorithm the caller does not handle (T-LoRA, kohya's
    own OFT, ...).
    """
    parsed = group_by_module(state_dict)
    if not parsed.modules:
        raise ConfigError(f"{source} has no lora_unet_/lora_te_ keys, so it is not a kohya LoRA/LyCORIS file")
    if parsed.other_keys:
        key = parsed.other_keys[0]
        raise ConfigError(f"{source} has an unknown key layout (key {key!r} is not a kohya LoRA/LyCORIS key)")
    v2 = str((metadata or {}).get("ss_v2", "False")).lower() == "true"
    kohya_oft = str((metadata or {}).get("ss_network_module", "")) == "networks.oft"
    modules = {}
    for name, parts in parsed.modules.items():
        algo = _detect_algo(name, parts, source, with_base)
        if algo == "oft" and kohya_oft:
            raise ConfigError(f"{source}: module {name} is kohya's own OFT (networks.oft), which these tools do not "
                              "handle yet")
        modules[name] = NetModule(name, algo, dict(parts), v2)
    return modules


def lora_module_state(name: str, up: torch.Tensor, down: torch.Tensor, alpha: float,
                      weight_shape) -> dict[str, torch.Tensor]:
    """kohya keys of one LoRA/LoCon module from ``up (out, r)``, ``down (r, n)``: 4-D factors for a
    conv weight (``up (out, r, 1, 1)``, ``down (r, in, kh, kw)``), 2-D for a linear one; 0-dim alpha."""
    shape = tuple(int(s) for s in weight_shape)
    r = int(down.shape[0])
    if len(shape) == 4:
        up = up.reshape(shape[0], r, 1, 1)
        down = down.reshape((r,) + shape[1:])
    else:
        up = up.reshape(shape[0], r)
        down = down.reshape(r, -1)
    return {
        f"{name}.lora_down.weight": down.contiguous(),
        f"{name}.lora_up.weight": up.contiguous(),
        f"{name}.alpha": torch.tensor(float(alpha), dtype=torch.float32),
    }


def unify_alpha(state: dict[str, torch.Tensor]) -> float | None:
    """Give every LoRA module of ``state`` the same alpha (the most common one), folding each module's
    own ``alpha / r`` into its factors (``sqrt(alpha_i / A)`` on each side), so deltas are unchanged.

    Training writes one alpha per file, and that is what every loader is tested with: diffusers 0.42
    (``get_peft_kwargs``) mis-names the per-module ``alpha_pattern`` of several layers (``to_out``,
    text-encoder attention) and silently applies the file's most common alpha to them. Returns the
    alpha (None when there is no LoRA module). Modifies ``state`` in place."""
    import math
    from collections import Counter

    alphas = {key[: -len(".alpha")]: float(t) for key, t in state.items()
              if key.endswith(".alpha") and f"{key[:-len('.alpha')]}.lora_up.weight" in state}
    if not alphas:
        return None
    common = Counter(alphas.values()).most_common(1)[0][0]
    if common <= 0 or not math.isfinite(common):
        common = 1.0
    for name, alpha in alphas.items():
        if alpha != common:
            root = math.sqrt(abs(alpha) / common)
            sign = -1.0 if alpha < 0 else 1.0
            state[f"{name}.lora_up.weight"] = state[f"{name}.lora_up.weight"] * (root * sign)
            state[f"{name}.lora_down.weight"] = state[f"{name}.lora_down.weight"] * root
        state[f"{name}.alpha"] = torch.tensor(common, dtype=torch.float32)
    return common
