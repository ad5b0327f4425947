"""LyCORIS networks (``network_module = lycoris.kohya``) through lycoris-lora 4.x.

:func:`parse_lycoris_args` turns kohya's string ``network_args`` into the real values LyCORIS
should see (it has no torch import, so preflight uses it); :func:`create_lycoris_network` builds the
network with ``lycoris.kohya.create_network`` and wraps it in :class:`LycorisNetworkAdapter`, which
gives it the engine's network interface and writes the file layout A1111, ComfyUI and LyCORIS read.

What this layer fixes or decides (facts: the reference's LyCORIS sections D.4/D.5 and the
platform notes' LyCORIS 4.1.3 section):

* **Values.** Booleans are parsed as true/false/1/0/yes/no/on/off (LyCORIS reads ``"0"`` and
  ``"no"`` as True, and takes ``decompose_both`` verbatim so that ``"False"`` turns it on); numbers
  are checked. ``conv_dim=0`` really turns 3x3 convs off and ``conv_alpha=0`` means alpha = rank
  (LyCORIS replaces a 0 by ``network_dim`` / ``network_alpha``). ``network_dropout`` fills
  ``dropout`` when it is not given (as kohya's trainer does).
* **Old names.** ``use_conv_cp``, ``use_cp`` and ``cp_decomp`` mean ``use_tucker``;
  ``disable_conv_cp=True`` means Tucker *off*, which is what the 2023 configs meant (the wizard wrote
  ``use_conv_cp=True`` for "CP decomposition: yes" and ``disable_conv_cp=True`` for "no";
  LyCORIS 3.0+ copies the value verbatim and turns Tucker on). ``constrain`` is ``constraint``.
* **Presets.** ``full`` (the default), ``full-lin`` and ``unet-only`` list the ``TimestepEmbedding``
  class (for Anima) besides ``time_embedding.linear_1/2`` and crash on diffusers' UNet with
  "duplicated lora name"; every built-in preset is used without that class, so the SD time
  embedding is adapted only where a preset names it (``full``, ``full-lin``, ``unet-only``), as in
  LyCORIS 3.x. ``attn-only`` targets ``CrossAttention``/``SelfAttention`` which diffusers calls
  ``Attention``; it gets that class too (otherwise it trains the text encoder only). A ``.toml``
  preset file is read and checked here.
* **LyCORIS's class-level preset state** is set for each build and put back afterwards, so one
  network's preset never leaks into the next.
* **Names.** LyCORIS names text-encoder modules from the installed transformers' module paths
  (``lora_te_encoder_...`` on transformers 5.6+); files get kohya's ``lora_te_text_model_encoder_...``
  and loading accepts both. UNet names follow the family's LoRA layout (SDXL: SGM names).
* **Loading** (``network_weights``) maps the file onto the network built from the settings (so
  IA3 files load too; LyCORIS's own ``create_network_from_weights`` fails on them), with a
  one-line error when the file's algorithm or ranks differ.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sd_scripts.core.errors import ConfigError
from sd_scripts.files import lora_keys
from sd_scripts.networks.block_weights import BLOCK_ARG_KEYS
from sd_scripts.networks.network_args import (
    SETTING, bad_arg, is_unset, parse_bool, parse_float, parse_int, parse_probability,
)

__all__ = [
    "NETWORK_MODULE", "LYCORIS_ALGOS", "LYCORIS_PRESETS", "LycorisArgs", "parse_lycoris_args", "read_preset_file",
    "builtin_preset", "lycoris_preset", "create_lycoris_network", "LycorisNetworkAdapter", "lycoris_names",
    "file_to_lycoris_names", "to_lycoris_state_dict", "lycoris_network_from_weights",
]

NETWORK_MODULE = "lycoris.kohya"

# algo -> what it is (for messages). All train, save and load with lycoris-lora 4.1.3.
LYCORIS_ALGOS: dict[str, str] = {
    "lora": "LoCon (LoRA on linear layers and convolutions)",
    "locon": "LoCon (same as lora)",
    "loha": "LoHa (Hadamard product)",
    "lokr": "LoKr (Kronecker product)",
    "ia3": "(IA)^3",
    "dylora": "DyLoRA",
    "full": "full fine-tune of the targeted layers (diff)",
    "diag-oft": "diagonal OFT",
    "boft": "butterfly OFT",
    "glora": "GLoRA",
}
# Algorithms LyCORIS has but this trainer refuses, with the reason.
_REFUSED_ALGOS = {
    "tlora": "its files need SVD buffers that are not saved, so no UI can load them",
}
LYCORIS_PRESETS = ("full", "full-lin", "attn-mlp", "attn-only", "unet-only", "unet-transformer-only",
                   "unet-convblock-only", "ia3")
# Keys a preset .toml may hold (lycoris config_sdk.VALID_PRESET_KEYS).
_PRESET_KEYS = ("enable_conv", "target_module", "target_name", "module_algo_map", "name_algo_map", "lora_prefix",
                "use_fnmatch", "unet_target_module", "unet_target_name", "text_encoder_target_module",
                "text_encoder_target_name", "exclude_name")

_BOOL_ARGS = ("use_tucker", "use_scalar", "train_norm", "rescaled", "dora_wd", "wd_on_output", "full_matrix",
              "bypass_mode", "rs_lora", "unbalanced_factorization", "decompose_both")
# 2023 names of use_tucker: name -> True when the value is inverted.
_TUCKER_ALIASES = {"use_conv_cp": False, "use_cp": False, "cp_decomp": False, "disable_conv_cp": True}
_PROBABILITY_ARGS = ("dropout", "rank_dropout", "module_dropout")
_LORAPLUS_ARGS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
_KNOWN_ARGS = (("algo", "preset", "conv_dim", "conv_alpha", "block_size", "factor", "constraint", "constrain")
               + _BOOL_ARGS + tuple(_TUCKER_ALIASES) + _PROBABILITY_ARGS + _LORAPLUS_ARGS)
# Algorithms without a rank (network_dim / conv_dim do not apply).
_RANKLESS = ("ia3", "full")


@dataclass
class LycorisArgs:
    """``network_args`` for LyCORIS as real values.

    ``kwargs`` go to ``lycoris.kohya.create_network`` (without ``preset``); ``preset`` is a built-in
    name or a path to a .toml file; ``enable_conv`` False when ``conv_dim=0``."""

    algo: str = "lora"
    preset: str = "full"
    kwargs: dict[str, Any] = field(default_factory=dict)
    enable_conv: bool | None = None
    warnings: list[str] = field(default_factory=list)


def parse_lycoris_args(args: Mapping[str, Any], *, network_dim: int | None = None, network_alpha: float | None = None,
                       network_dropout: float | None = None) -> LycorisArgs:
    """Parse kohya ``network_args`` (the :func:`split_network_args` dict) for ``lycoris.kohya``.

    Raises ConfigError naming network_args and the key for an unknown algo or preset, a value that
    is not a number/boolean, or contradicting Tucker switches. Cheap: no torch, no lycoris import."""
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    out = LycorisArgs()
    raw = {k: v for k, v in args.items() if not is_unset(v)}

    algo = str(raw.get("algo", "lora")).strip().lower()
    if algo in _REFUSED_ALGOS:
        raise bad_arg("algo", raw["algo"], f"is not supported: {_REFUSED_ALGOS[algo]}; use one of "
                                           f"{', '.join(LYCORIS_ALGOS)}")
    if algo not in LYCORIS_ALGOS:
        raise bad_arg("algo", raw["algo"], f"is not a LyCORIS algorithm; use one of {', '.join(LYCORIS_ALGOS)}")
    out.algo = algo
    kw = out.kwargs
    kw["algo"] = algo

    preset = str(raw.get("preset", "full")).strip()
    if preset.lower() in LYCORIS_PRESETS:
        out.preset = preset.lower()
    elif preset.lower().endswith(".toml") or os.path.isfile(preset):
        read_preset_file(preset)  # checks it
        out.preset = preset
    else:
        raise bad_arg("preset", preset, f"is not a LyCORIS preset; use one of {', '.join(LYCORIS_PRESETS)} "
                                        "or the path of a preset .toml file")
    if algo == "ia3" and out.preset not in ("ia3",) and "preset" not in raw:
        out.warnings.append("network_args: algo=ia3 usually goes with preset=ia3 (LyCORIS recommends it); "
                            "using preset=full")

    conv_dim = parse_int("conv_dim", raw.get("conv_dim"), minimum=0)
    if conv_dim == 0:
        out.enable_conv = False
    elif conv_dim is not None:
        kw["conv_dim"] = conv_dim
    conv_alpha = parse_float("conv_alpha", raw.get("conv_alpha"), minimum=0.0)
    if conv_alpha is not None:
        # LyCORIS turns a 0 into network_alpha; 0 means alpha = rank everywhere else.
        kw["conv_alpha"] = float(conv_alpha or (conv_dim or network_dim))

    for key in _PROBABILITY_ARGS:
        value = parse_probability(key, raw.get(key))
        if value is not None:
            kw[key] = value
    if "dropout" not in kw and network_dropout is not None:
        kw["dropout"] = parse_probability("network_dropout", network_dropout)

    block_size = parse_int("block_size", raw.get("block_size"), minimum=1)
    if block_size is not None:
        kw["block_size"] = block_size
    factor = parse_int("factor", raw.get("factor"), example="-1")
    if factor is not None:
        if factor == 0 or factor < -1:
            raise bad_arg("factor", raw["factor"], "must be -1 (balanced) or a positive whole number like 8")
        kw["factor"] = factor
    if "constrain" in raw and "constraint" not in raw:
        out.warnings.append("network_args: constrain is the old name of constraint; read as constraint")
    constraint = parse_float("constraint", raw.get("constraint", raw.get("constrain")), minimum=0.0)
    if constraint is not None:
        kw["constraint"] = constraint
    for key in _LORAPLUS_ARGS:
        value = parse_float(key, raw.get(key), above=0.0, example="16")
        if value is not None:
            kw[key] = value

    for key in _BOOL_ARGS:
        value = parse_bool(key, raw.get(key))
        if value is not None:
            kw[key] = value

    # Tucker: use_tucker and its 2023 names must agree.
    tucker: dict[str, bool] = {}
    if "use_tucker" in kw:
        tucker["use_tucker"] = kw["use_tucker"]
    for alias, inverted in _TUCKER_ALIASES.items():
        value = parse_bool(alias, raw.get(alias))
        if value is None:
            continue
        meaning = (not value) if inverted else value
        tucker[alias] = meaning
        out.warnings.append(f"network_args: {alias}={raw[alias]} is a 2023 name; read as use_tucker={meaning}")
    if len(set(tucker.values())) > 1:
        shown = ", ".join(f"{k}={raw[k]}" for k in tucker)
        raise ConfigError(f"{SETTING}: {shown} contradict each other (Tucker on and off); keep only use_tucker",
                          setting=SETTING)
    if tucker:
        kw["use_tucker"] = next(iter(tucker.values()))

    # Combinations LyCORIS cannot build.
    if algo == "dylora":
        size = kw.get("block_size", 4)
        for name, dim in (("network_dim", network_dim), ("conv_dim", kw.get("conv_dim", network_dim))):
            if dim % size:
                raise bad_arg("block_size", size, f"must divide {name} {dim} for algo=dylora; pick a block_size "
                                                  "that divides both network_dim and conv_dim")
    if algo == "glora" and kw.get("use_tucker"):
        raise bad_arg("use_tucker", raw.get("use_tucker", "True"), "cannot be used with algo=glora "
                                                                   "(LyCORIS cannot build Tucker GLoRA); turn it off")
    if algo == "full" and kw.get("bypass_mode"):
        raise bad_arg("bypass_mode", raw["bypass_mode"], "cannot be used with algo=full; turn it off")
    if algo in ("loha", "lokr") and kw.get("dropout"):
        # LyCORIS 4.x ignores it there and prints a warning line per module
        kw.pop("dropout")
        out.warnings.append(f"network_args: dropout (network_dropout) does nothing with algo={algo}; "
                            "use rank_dropout or module_dropout")
    if algo in _RANKLESS and (kw.get("use_tucker") or kw.get("dora_wd")):
        which = "use_tucker" if kw.get("use_tucker") else "dora_wd"
        out.warnings.append(f"network_args: {which} does nothing with algo={algo}")

    block_keys = [k for k in raw if k in BLOCK_ARG_KEYS]
    if block_keys:
        out.warnings.append(f"network_args: {', '.join(block_keys)} work with network_module networks.lora only; "
                            "lycoris.kohya ignores them")
    unknown = [k for k in raw if k not in _KNOWN_ARGS and k not in BLOCK_ARG_KEYS]
    if unknown:
        out.warnings.append(f"network_args not used by {NETWORK_MODULE}: {', '.join(unknown)}")
    return out


def _load_toml(path: str) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import toml

        return toml.load(path)
    with open(path, "rb") as f:
        return tomllib.load(f)


def read_preset_file(path: str) -> dict[str, Any]:
    """Read and check a LyCORIS preset .toml; ConfigError naming network_args when it cannot be used."""
    if not os.path.isfile(path):
        raise bad_arg("preset", path, "was not found; give the path of a preset .toml file or a built-in preset name")
    try:
        data = _load_toml(path)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise bad_arg("preset", path, f"is not a valid TOML file ({first})") from None
    unknown = sorted(k for k in data if k not in _PRESET_KEYS)
    if unknown:
        raise bad_arg("preset", path, f"has unknown keys {', '.join(unknown)}; valid keys are {', '.join(_PRESET_KEYS)}")
    for key, value in data.items():
        if key in ("enable_conv", "use_fnmatch"):
            ok, what = isinstance(value, bool), "true or false"
        elif key.endswith("algo_map"):
            ok, what = isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()), "a table of tables"
        elif key == "lora_prefix":
            ok, what = isinstance(value, str), "a string"
        else:
            ok, what = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"
        if not ok:
            raise bad_arg("preset", path, f"has {key} = {value!r}, which must be {what}")
    return data


# --------------------------------------------------------------------------- lycoris state

_CLASS_ATTRS = {
    "enable_conv": ("ENABLE_CONV", True),
    "unet_target_module": ("UNET_TARGET_REPLACE_MODULE", []),
    "unet_target_name": ("UNET_TARGET_REPLACE_NAME", []),
    "text_encoder_target_module": ("TEXT_ENCODER_TARGET_REPLACE_MODULE", []),
    "text_encoder_target_name": ("TEXT_ENCODER_TARGET_REPLACE_NAME", []),
    "module_algo_map": ("MODULE_ALGO_MAP", {}),
    "name_algo_map": ("NAME_ALGO_MAP", {}),
    "use_fnmatch": ("USE_FNMATCH", False),
    "exclude_name": ("TARGET_EXCLUDE_NAME", []),
}
_PRIVATE_PRESET = "_lets_current_preset"


@contextlib.contextmanager
def _quiet_imports():
    """bitsandbytes (imported by lycoris) logs a CPU-kernel warning on import; keep it out of the output."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _lycoris():
    with _quiet_imports():
        import lycoris.kohya as kohya
        from lycoris import config
    return kohya, config


def builtin_preset(name: str) -> dict[str, Any]:
    """A built-in LyCORIS preset as a complete dict, fixed for diffusers UNets (see the module docstring)."""
    _, config = _lycoris()
    preset = dict(config.PRESET[name])
    preset["unet_target_module"] = [m for m in preset.get("unet_target_module", []) if m != "TimestepEmbedding"]
    if name == "attn-only":
        preset["unet_target_module"] = preset["unet_target_module"] + ["Attention"]
    if name == "ia3":
        # LyCORIS matches target names against whole module paths with re.match, so the plain
        # "to_k" / "k_proj" ... of this preset match nothing in diffusers / transformers models.
        preset["use_fnmatch"] = True
        for key in ("unet_target_name", "text_encoder_target_name"):
            preset[key] = [f"*.{n}" for n in preset.get(key, [])]
        preset["name_algo_map"] = {f"*.{k}": v for k, v in preset.get("name_algo_map", {}).items()}
    return _complete(preset)


def _complete(preset: Mapping[str, Any]) -> dict[str, Any]:
    out = {key: preset.get(key, default) for key, (_, default) in _CLASS_ATTRS.items()}
    out = {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v) for k, v in out.items()}
    return out


def _resolve_preset(args: LycorisArgs) -> dict[str, Any]:
    if args.preset in LYCORIS_PRESETS:
        preset = builtin_preset(args.preset)
    else:
        _lycoris()
        from lycoris.config_sdk import PresetConfig, PresetValidationError

        data = read_preset_file(args.preset)
        try:
            preset = _complete(PresetConfig.from_dict(data).to_dict())
        except PresetValidationError as e:
            raise bad_arg("preset", args.preset, f"is not a valid LyCORIS preset ({e})") from None
    if args.enable_conv is False:
        preset["enable_conv"] = False
    return preset


@contextlib.contextmanager
def lycoris_logs(records: list[logging.LogRecord] | None = None):
    """Within the block, LyCORIS log records of level WARNING and above go to ``records`` (and the
    INFO chatter nowhere) instead of stdout."""
    _lycoris()
    from lycoris.logging import logger

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if records is not None:
                records.append(record)

    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    logger.handlers = [_Collect(logging.WARNING)]
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.handlers = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@contextlib.contextmanager
def lycoris_preset(preset: Mapping[str, Any], records: list[logging.LogRecord] | None = None):
    """Within the block, ``LycorisNetworkKohya`` has exactly ``preset`` (its class-level targets) and is
    known to ``create_network`` under a private preset name, which the block receives; LyCORIS log
    records go to ``records`` (see :func:`lycoris_logs`). Everything is put back afterwards."""
    kohya, config = _lycoris()
    cls = kohya.LycorisNetworkKohya
    saved = {attr: cls.__dict__[attr] for attr, _ in _CLASS_ATTRS.values() if attr in cls.__dict__}
    full = _complete(preset)
    config.PRESET[_PRIVATE_PRESET] = full
    cls.apply_preset(full)
    try:
        with lycoris_logs(records):
            yield _PRIVATE_PRESET
    finally:
        config.PRESET.pop(_PRIVATE_PRESET, None)
        for attr, _ in _CLASS_ATTRS.values():
            if attr in saved:
                setattr(cls, attr, saved[attr])
            elif attr in cls.__dict__:
                delattr(cls, attr)


# --------------------------------------------------------------------------- network

def _make_adapter_class():
    import torch
    from torch import nn

    from sd_scripts.networks.lora import build_param_groups

    class _Adapter(nn.Module):
        """A LyCORIS network with the engine's network interface (see the module docstring).

        ``self.lycoris`` is the ``LycorisNetworkKohya``; the models are referenced, not registered."""

        def __init__(self, net, unet, te_arg, *, train_unet: bool, train_text_encoder: bool,
                     te_prefixes: Sequence[str], unet_path_map=None, algo: str = "lora",
                     loraplus: Mapping[str, float] | None = None):
            super().__init__()
            self.lycoris = net
            object.__setattr__(self, "_unet", unet)
            object.__setattr__(self, "_te_arg", te_arg)
            self.train_unet = train_unet
            self.train_text_encoder = train_text_encoder
            self.te_prefixes = tuple(te_prefixes)
            self.unet_path_map = unet_path_map
            self.algo = algo
            loraplus = dict(loraplus or {})
            self.loraplus_lr_ratio = loraplus.get("loraplus_lr_ratio")
            self.loraplus_unet_lr_ratio = loraplus.get("loraplus_unet_lr_ratio")
            self.loraplus_text_encoder_lr_ratio = loraplus.get("loraplus_text_encoder_lr_ratio")
            self.multiplier = 1.0
            self._applied = False
            self._to_file: dict[str, str] = {}
            self._from_file: dict[str, str] = {}

        # ---- access
        @property
        def text_encoder_loras(self) -> list:
            return list(self.lycoris.text_encoder_loras)

        @property
        def unet_loras(self) -> list:
            return list(self.lycoris.unet_loras)

        @property
        def loras(self) -> list:
            return self.text_encoder_loras + self.unet_loras

        @property
        def applied(self) -> bool:
            return self._applied

        def file_names(self) -> dict[str, str]:
            """``{LyCORIS module name: kohya file name}``."""
            return dict(self._to_file)

        # ---- patching
        def apply_to(self) -> None:
            if self._applied:
                return
            with lycoris_logs():
                self.lycoris.apply_to(self._te_arg, self._unet, apply_text_encoder=self.train_text_encoder,
                                      apply_unet=self.train_unet)
            self._applied = True
            self._to_file = lycoris_names(self.lycoris, self._unet, self.unet_path_map)
            self._from_file = {v: k for k, v in self._to_file.items()}

        def remove(self) -> None:
            for lora in reversed(self.loras):
                lora.restore()
            self._applied = False

        def set_multiplier(self, multiplier: float) -> None:
            self.multiplier = multiplier
            for lora in self.loras:
                lora.multiplier = multiplier

        def supports_max_norm(self) -> bool:
            """True when some module has LyCORIS's own max-norm (LoCon, LoHa, LoKr, OFT; not full, IA3, DyLoRA...)."""
            if not hasattr(self.lycoris, "apply_max_norm_regularization"):
                return False
            try:
                from lycoris.modules.base import LycorisBaseModule
            except ImportError:  # another layout of lycoris-lora: trust its network method
                return True
            base = LycorisBaseModule.apply_max_norm
            return any(getattr(type(lora), "apply_max_norm", base) is not base for lora in self.loras)

        @torch.no_grad()
        def apply_max_norm_regularization(self, max_norm_value: float, device=None) -> tuple[int, float, float]:
            """``scale_weight_norms`` through lycoris-lora's own ``apply_max_norm_regularization``:
            ``(keys_scaled, mean norm, max norm)``; LyCORIS reports 0 norms when no module was scaled."""
            keys, mean, largest = self.lycoris.apply_max_norm_regularization(max_norm_value, device)
            for lora in self.loras:
                _fold_scalar(lora)
            return int(keys), float(mean), float(largest)

        # ---- optimizer
        def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
            """Groups as :func:`sd_scripts.networks.lora.build_param_groups` (``textencoder``, ``unet``,
            ``... plus`` for LoRA+)."""
            self.requires_grad_(True)
            return build_param_groups(
                self.text_encoder_loras, self.unet_loras, self.te_prefixes, text_encoder_lr, unet_lr, default_lr,
                te_plus_ratio=self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio,
                unet_plus_ratio=self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio)

        # ---- state dict
        def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
            """Every parameter and persistent buffer of the LyCORIS modules as they are (``<module>.<path>``),
            for saving and resuming a training state exactly. LyCORIS's own ``state_dict`` (the file
            layout, :meth:`kohya_state_dict`) is computed (full: weight - original) and not every
            module loads it back (DyLoRA ignores it)."""
            from collections import OrderedDict

            out = OrderedDict() if destination is None else destination
            for lora in self.loras:
                for path, module in lora.named_modules(prefix=f"{prefix}{lora.lora_name}"):
                    for name, param in module._parameters.items():
                        if param is not None:
                            out[f"{path}.{name}"] = param if keep_vars else param.detach()
                    for name, buf in module._buffers.items():
                        if buf is not None and name not in module._non_persistent_buffers_set:
                            out[f"{path}.{name}"] = buf if keep_vars else buf.detach()
            return out

        def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
            """Copy a :meth:`state_dict` back (exactly)."""
            from torch.nn.modules.module import _IncompatibleKeys

            own = self.state_dict(keep_vars=True)
            missing = [k for k in own if k not in state_dict]
            unexpected = [k for k in state_dict if k not in own]
            if strict and (missing or unexpected):
                raise RuntimeError(f"Error(s) in loading state_dict for LycorisNetworkAdapter: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}")
            with torch.no_grad():
                for key, value in state_dict.items():
                    if key in own:
                        if tuple(own[key].shape) != tuple(value.shape):
                            raise RuntimeError(f"size mismatch for {key}: {tuple(value.shape)} vs {tuple(own[key].shape)}")
                        own[key].copy_(value)
            return _IncompatibleKeys(missing, unexpected)

        def kohya_state_dict(self) -> dict[str, torch.Tensor]:
            """The LyCORIS state dict (what ``save_weights`` writes) under kohya module names.

            LyCORIS's DyLoRA writes a 2-D ``lora_up`` for convolutions; it is written
            ``[out, r, 1, 1]`` here, as every other LoRA conv (A1111 and LyCORIS's own loader need it)."""
            sd = self.lycoris.state_dict()
            out: dict[str, torch.Tensor] = {}
            for key, value in sd.items():
                name, _, part = key.partition(".")
                if part == "lora_up.weight" and value.dim() == 2:
                    down = sd.get(f"{name}.lora_down.weight")
                    if down is not None and down.dim() == 4:
                        value = value.reshape(*value.shape, 1, 1)
                out[f"{self._to_file.get(name, name)}.{part}"] = value.detach()
            return out

        @torch.no_grad()
        def load_kohya_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = False,
                                  setting: str = "network_weights"):
            """Load a LyCORIS/kohya file (either text-encoder spelling) into this network.

            A module whose tensors do not fit this network (another algo, rank or Tucker setting)
            raises ConfigError naming ``setting``; so does a file that shares no module with it, and
            with ``strict`` a file that lacks modules or has extra ones."""
            from sd_scripts.networks.lora import LoadResult

            mapped: dict[str, torch.Tensor] = {}
            unexpected: list[str] = []
            file_modules: set[str] = set()
            for key, value in state_dict.items():
                name, _, part = key.partition(".")
                target = self._from_file.get(lora_keys.canonical_lora_name(name))
                if target is None or not part:
                    unexpected.append(key)
                    continue
                file_modules.add(target)
                mapped[f"{target}.{part}"] = value
            own = self.kohya_state_dict()
            own = {f"{self._from_file.get(k.partition('.')[0], k.partition('.')[0])}.{k.partition('.')[2]}": v
                   for k, v in own.items()}
            extra = sorted(k for k in mapped if k not in own)
            if extra:
                name, _, part = extra[0].partition(".")
                raise ConfigError(
                    f"{setting}: module {self._to_file.get(name, name)} has {part}, which this algo={self.algo} network "
                    "does not; set algo (and use_tucker, dora_wd) to the file's (see its ss_network_args)",
                    setting=setting)
            if not mapped:
                raise ConfigError(f"{setting}: the file has no module of this network; use a LyCORIS file trained "
                                  "for this model with the same preset", setting=setting)
            for key, value in mapped.items():
                expected = own[key]
                if tuple(value.shape) != tuple(expected.shape) and not (
                        key.endswith("lora_up.weight") and value.numel() == expected.numel()):
                    name, _, part = key.partition(".")
                    raise ConfigError(
                        f"{setting}: {self._to_file.get(name, name)}.{part} has shape {tuple(value.shape)} but the "
                        f"network expects {tuple(expected.shape)}; set network_dim/conv_dim (and factor) to the file's",
                        setting=setting)
            missing_modules = sorted(self._to_file[n] for n in self._to_file if n not in file_modules)
            missing_in_module = sorted(k for k in own if k.partition(".")[0] in file_modules and k not in mapped)
            if missing_in_module:
                name, _, part = missing_in_module[0].partition(".")
                raise ConfigError(f"{setting}: module {self._to_file.get(name, name)} lacks {part}; set algo "
                                  "(and use_tucker, dora_wd) to the file's", setting=setting)

            by_name = {lora.lora_name: lora for lora in self.loras}
            plain: dict[str, torch.Tensor] = {}
            for key, value in mapped.items():
                name, _, part = key.partition(".")
                lora = by_name[name]
                if hasattr(lora, "up_list"):  # LyCORIS DyLoRA ignores load_state_dict
                    _load_dylora_part(lora, part, value)
                    continue
                if hasattr(lora, "_org_weight") and not getattr(lora, "is_diff", True):
                    # LyCORIS's full module adds the file's diff to its *current* weight.
                    lora.weight.data.copy_(lora._org_weight[0].to(lora.weight))
                    if lora.bias is not None and lora.org_bias is not None:
                        lora.bias.data.copy_(lora.org_bias[0].to(lora.bias))
                plain[key] = value
            if plain:
                with lycoris_logs():
                    self.lycoris.load_state_dict(plain, strict=False)
            result = LoadResult(missing=missing_modules, unexpected=unexpected)
            if strict and (result.missing or result.unexpected):
                detail = (f"has {len(result.unexpected)} tensors this network lacks (e.g. {result.unexpected[0]})"
                          if result.unexpected else
                          f"lacks {len(result.missing)} modules of this network (e.g. {result.missing[0]})")
                raise ConfigError(f"{setting}: the file {detail}; use the settings it was trained with", setting=setting)
            return result

    def _fold_scalar(lora) -> None:
        """LoCon/LoHa max-norm scales a non-persistent ``scalar`` buffer, which a training state would not
        keep: fold it into ``lora_up`` / ``hada_w1_a`` (the delta is linear in either) and set it back to 1."""
        scalar = lora._buffers.get("scalar")
        if scalar is None or "scalar" not in lora._non_persistent_buffers_set or bool((scalar == 1).all()):
            return
        factor = lora.lora_up.weight if hasattr(lora, "lora_up") else getattr(lora, "hada_w1_a", None)
        if factor is None:
            return
        factor.mul_(scalar.to(factor))
        scalar.fill_(1)

    def _load_dylora_part(lora, part: str, value: torch.Tensor) -> None:
        if part == "alpha":
            lora.alpha.copy_(value.to(lora.alpha))
            alpha = float(value.float().item()) or lora.lora_dim
            lora.scale = alpha / lora.lora_dim
        elif part == "lora_down.weight":
            rows = value.reshape(lora.lora_dim, -1)
            for i, p in enumerate(lora.down_list):
                p.copy_(rows[i * lora.block_size:(i + 1) * lora.block_size].to(p))
        elif part == "lora_up.weight":
            cols = value.reshape(value.shape[0], lora.lora_dim)
            for i, p in enumerate(lora.up_list):
                p.copy_(cols[:, i * lora.block_size:(i + 1) * lora.block_size].to(p))

    return _Adapter


_ADAPTER_CLASS = None


def _adapter_class():
    global _ADAPTER_CLASS
    if _ADAPTER_CLASS is None:
        _ADAPTER_CLASS = _make_adapter_class()
        _ADAPTER_CLASS.__name__ = _ADAPTER_CLASS.__qualname__ = "LycorisNetworkAdapter"
        _ADAPTER_CLASS.__module__ = __name__
    return _ADAPTER_CLASS


def __getattr__(name: str):
    # The adapter class needs torch; it is made on first use so that importing this module (for
    # parse_lycoris_args in preflight) stays cheap.
    if name == "LycorisNetworkAdapter":
        return _adapter_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _mapped_unet_name(path: str, unet_path_map) -> str | None:
    try:
        mapped = unet_path_map(path)
    except (KeyError, ValueError, IndexError):
        return None
    return lora_keys.lora_name(lora_keys.PREFIX_UNET, mapped) if mapped else None


def lycoris_names(net, unet, unet_path_map=None) -> dict[str, str]:
    """``{LyCORIS module name: kohya file name}`` for every module of an applied LyCORIS network:
    text-encoder names with ``text_model`` (kohya's spelling), UNet names in the family's layout."""
    names: dict[str, str] = {}
    unet_paths: dict[str, str] = {}
    if unet_path_map is not None and unet is not None:
        unet_paths = {lora_keys.lora_name(lora_keys.PREFIX_UNET, path): path for path, _ in unet.named_modules() if path}
    for lora in list(net.text_encoder_loras) + list(net.unet_loras):
        name = lora.lora_name
        mapped = None
        if name.startswith(lora_keys.PREFIX_UNET + "_") and name in unet_paths:
            mapped = _mapped_unet_name(unet_paths[name], unet_path_map)
        names[name] = mapped or lora_keys.canonical_lora_name(name)
    return names


def file_to_lycoris_names(unet, text_encoders, te_prefixes: Sequence[str] = (lora_keys.PREFIX_TE,),
                          unet_path_map=None) -> dict[str, str]:
    """``{kohya file name: LyCORIS module name}`` for every Linear/Conv of the UNet and text encoders:
    the names ``lycoris.kohya.create_network_from_weights`` needs for a file this trainer wrote."""
    from torch import nn

    out: dict[str, str] = {}
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.GroupNorm)
    if unet is not None:
        for path, module in unet.named_modules():
            if not path or not isinstance(module, kinds):
                continue
            own = lora_keys.lora_name(lora_keys.PREFIX_UNET, path)
            out[(_mapped_unet_name(path, unet_path_map) if unet_path_map else None) or own] = own
    tes = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    for prefix, te in zip(te_prefixes, tes):
        if te is None:
            continue
        for path, module in te.named_modules():
            if path and isinstance(module, kinds):
                own = f"{prefix}_{path}".replace(".", "_")
                out[lora_keys.canonical_lora_name(own)] = own
    return out


def to_lycoris_state_dict(state_dict: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """A kohya-named LyCORIS file's tensors under the model's own LyCORIS names (see
    :func:`file_to_lycoris_names`); keys of unknown modules are kept as they are."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        name, dot, part = key.partition(".")
        out[f"{names.get(lora_keys.canonical_lora_name(name), name)}{dot}{part}"] = value
    return out


def lycoris_network_from_weights(state_dict: Mapping[str, Any], unet, text_encoders, args: LycorisArgs, *,
                                 train_unet: bool = True, train_text_encoder: bool = True,
                                 te_prefixes: Sequence[str] = (lora_keys.PREFIX_TE,), unet_path_map=None):
    """A LyCORIS network with exactly the modules, algorithms and ranks of a file (``dim_from_weights``),
    built by ``lycoris.kohya.create_network_from_weights``; weights not loaded. Returns
    ``(adapter, warnings)``, or ``(None, warnings)`` for IA3 files, which that function cannot read
    (the caller then builds from the settings)."""
    kohya, _ = _lycoris()
    if any(key.endswith(".on_input") for key in state_dict):
        return None, ["dim_from_weights: the file is (IA)^3, which has no rank; the network is built from the settings"]
    if args.algo == "dylora":
        return None, ["dim_from_weights: LyCORIS reads DyLoRA files as LoCon; the DyLoRA network is built from the "
                      "settings (network_dim, conv_dim, block_size)"]
    tes = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    te_arg = None
    if train_text_encoder and tes:
        te_arg = tes if len(tuple(te_prefixes)) > 1 else tes[0]
    names = file_to_lycoris_names(unet, tes, te_prefixes, unet_path_map)
    renamed = to_lycoris_state_dict(state_dict, names)
    records: list[logging.LogRecord] = []
    with lycoris_preset(_resolve_preset(args), records):
        try:
            net, _ = kohya.create_network_from_weights(1.0, None, None, te_arg, unet, weights_sd=renamed)
        except (RuntimeError, ValueError, TypeError, AssertionError, KeyError) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0][:160]
            raise ConfigError(f"network_weights: LyCORIS cannot rebuild the file's modules from their shapes ({first}); "
                              "turn dim_from_weights off and set network_dim, conv_dim and network_args as the file was "
                              "trained", setting="network_weights") from None
    if not (net.unet_loras or net.text_encoder_loras):
        raise ConfigError("network_weights: no module of the file matches this model; the file was made for another "
                          "model family or network type", setting="network_weights")
    for lora in list(net.unet_loras) + list(net.text_encoder_loras):
        for key in _PROBABILITY_ARGS:
            if key in args.kwargs and hasattr(lora, key):
                setattr(lora, key, args.kwargs[key])
    loraplus = {k: args.kwargs[k] for k in _LORAPLUS_ARGS if args.kwargs.get(k) is not None}
    algo = args.algo
    adapter = _adapter_class()(net, unet, te_arg, train_unet=train_unet, train_text_encoder=train_text_encoder,
                               te_prefixes=te_prefixes, unet_path_map=unet_path_map, algo=algo, loraplus=loraplus)
    return adapter, [f"LyCORIS: {r.getMessage().splitlines()[0]}" for r in records]


def create_lycoris_network(unet, text_encoders, args: LycorisArgs, *, network_dim: int | None, network_alpha: float | None,
                           train_unet: bool = True, train_text_encoder: bool = True,
                           te_prefixes: Sequence[str] = (lora_keys.PREFIX_TE,), unet_path_map=None,
                           multiplier: float = 1.0):
    """Build (not apply) a LyCORIS network for ``unet`` / ``text_encoders`` with parsed ``args``.

    Returns ``(adapter, warnings)``. A preset that targets no module of the parts being trained
    raises ConfigError naming network_args."""
    kohya, _ = _lycoris()
    tes = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    te_arg = None
    if train_text_encoder and tes:
        te_arg = tes if len(tuple(te_prefixes)) > 1 else tes[0]
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    kwargs = dict(args.kwargs)
    loraplus = {k: kwargs.get(k) for k in _LORAPLUS_ARGS if kwargs.get(k) is not None}
    preset = _resolve_preset(args)
    records: list[logging.LogRecord] = []
    with lycoris_preset(preset, records) as preset_name:
        try:
            net = kohya.create_network(multiplier, network_dim, network_alpha, None, te_arg, unet,
                                       warn_on_unmatched=False, preset=preset_name, **kwargs)
        except AssertionError as e:
            if "duplicated lora name" in str(e):
                raise bad_arg("preset", args.preset, f"targets a module twice ({str(e).split(':')[-1].strip()}), by "
                                                     "class and by name; remove one of them from the preset") from None
            raise
    warnings = list(args.warnings)
    seen: set[str] = set()
    for record in records:
        text = record.getMessage().splitlines()[0]
        if text.startswith("It is recommended to use preset ia3"):
            continue  # LyCORIS compares our private preset name; parse_lycoris_args has its own warning
        if text not in seen:
            seen.add(text)
            warnings.append(f"LyCORIS: {text}")
    n_te = len(net.text_encoder_loras) if train_text_encoder else 0
    n_unet = len(net.unet_loras) if train_unet else 0
    if n_te + n_unet == 0:
        parts = " and ".join(p for p, on in (("UNet", train_unet), ("text encoder", train_text_encoder)) if on)
        raise ConfigError(f"{SETTING}: preset={args.preset} adapts no layer of the {parts}; pick another preset "
                          f"(e.g. {'full' if args.preset != 'full' else 'attn-mlp'})", setting=SETTING)
    if train_unet and n_unet == 0:
        warnings.append(f"network_args: preset={args.preset} adapts no UNet layer; only the text encoder trains")
    if train_text_encoder and te_arg is not None and n_te == 0:
        warnings.append(f"network_args: preset={args.preset} adapts no text-encoder layer; only the UNet trains")
    adapter = _adapter_class()(net, unet, te_arg, train_unet=train_unet, train_text_encoder=train_text_encoder,
                               te_prefixes=te_prefixes, unet_path_map=unet_path_map, algo=args.algo, loraplus=loraplus)
    return adapter, warnings
