"""Build the trainable network a run asks for (``network_module`` + ``network_args``).

The training loop calls :func:`build_network` and only uses the returned network's common
interface, :class:`sd_scripts.networks.trainable.TrainableNetwork`, so adding a network kind never
touches the loop. Preflight calls :func:`check_network_settings`,
which parses and checks the same settings without torch or a model.

Network modules (kohya's names; the ``sd_scripts.`` spelling of the 2023 tool is accepted):

* ``networks.lora``: kohya LoRA / LoCon (``conv_dim``), block weights (``down_lr_weight``,
  ``block_dims``, ...; :mod:`sd_scripts.networks.block_weights`), LoRA+ ratios, dropouts.
* ``networks.dylora``: kohya DyLoRA (``unit``; :mod:`sd_scripts.networks.dylora`).
* ``lycoris.kohya``: LyCORIS through lycoris-lora (``algo``, ``preset``, ...;
  :mod:`sd_scripts.networks.lycoris_adapter`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import ConfigError
from sd_scripts.core.problems import Problems
from sd_scripts.networks.block_weights import BLOCK_ARG_KEYS, BlockSettings, layout_for_family, resolve_block_settings
from sd_scripts.networks.network_args import parse_float, parse_int, parse_probability, split_network_args
from sd_scripts.networks.trainable import TrainableNetwork

__all__ = ["BuiltNetwork", "NetworkPlan", "NETWORK_MODULES", "network_kind", "plan_network", "check_network_settings",
           "build_network"]

# network_module -> kind
NETWORK_MODULES = {
    "networks.lora": "lora",
    "sd_scripts.networks.lora": "lora",
    "networks.lora_flux": "lora",  # kohya's FLUX.1 LoRA: the same network on FLUX.1's modules
    "networks.dylora": "dylora",
    "sd_scripts.networks.dylora": "dylora",
    "lycoris.kohya": "lycoris",
}
_LYCORIS_ONLY = ("algo", "preset", "use_tucker", "use_conv_cp", "disable_conv_cp", "use_cp", "cp_decomp", "factor",
                 "decompose_both", "full_matrix", "dora_wd", "block_size", "use_scalar", "train_norm", "constraint",
                 "constrain", "rescaled", "bypass_mode", "rs_lora", "wd_on_output", "unbalanced_factorization")
_LORA_ARGS = ("conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout",
              "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


@dataclass
class BuiltNetwork:
    network: TrainableNetwork
    network_dim: object
    network_alpha: object
    network_args: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class NetworkPlan:
    """The network settings of a run, parsed and checked (no torch)."""

    kind: str  # "lora" | "dylora" | "lycoris"
    network_dim: int
    network_alpha: float
    raw_args: dict[str, str] = field(default_factory=dict)  # verbatim, for ss_network_args
    values: dict[str, Any] = field(default_factory=dict)  # lora/dylora: conv_dim, dropouts, loraplus ratios
    blocks: BlockSettings | None = None
    unit: int | None = None
    lycoris: Any = None  # LycorisArgs
    problems: Problems = field(default_factory=Problems)  # what planning found (warnings; errors raise)

    @property
    def warnings(self) -> list[str]:
        return self.problems.warnings


def network_kind(network_module: str | None) -> str:
    """``"lora"``, ``"dylora"`` or ``"lycoris"`` for a ``network_module``; ConfigError naming it otherwise."""
    key = (network_module or "networks.lora").strip()
    kind = NETWORK_MODULES.get(key) or NETWORK_MODULES.get(key.lower())
    if kind is None:
        raise ConfigError(f"network_module: unknown module {network_module!r}; use networks.lora, "
                          "networks.dylora or lycoris.kohya", setting="network_module")
    return kind


def _family_hint(config: TrainConfig, family):
    if family is not None:
        return family
    # check_network_settings takes any object with the network settings: the cheap check of
    # tests/test_lycoris_networks.py passes a SimpleNamespace without the model settings
    if getattr(config, "sdxl", None):
        return "sdxl"
    if getattr(config, "model_family", None):
        return config.model_family
    return None


def plan_network(config: TrainConfig, family: Any = None, model_info: dict | None = None) -> NetworkPlan:
    """Parse and check ``network_module``, ``network_dim``/``alpha``/``dropout`` and ``network_args``.

    ``family`` (a ModelFamily or its name; default: what the settings force, else SD1/SD2) sets the
    block-weight list lengths and checks the family's own network_args (``ModelFamily.lora_arg_problems``, with
    ``model_info``: what detection read, e.g. FLUX.1's block counts). Raises ConfigError naming the setting; problems
    that do not stop the run are in ``warnings``."""
    kind = network_kind(config.network_module)
    raw = split_network_args(config.network_args)
    dim = config.network_dim
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, float)) or dim < 1 or dim != int(dim)):
        raise ConfigError(f"network_dim: must be 1 or more, got {dim}", setting="network_dim")
    network_dim = 4 if dim is None else int(dim)
    alpha = config.network_alpha
    network_alpha = 1.0 if alpha is None else alpha
    try:
        network_alpha = float(network_alpha)
    except (TypeError, ValueError):
        raise ConfigError(f"network_alpha: {alpha!r} is not a number; write it like 1 or 8", setting="network_alpha") from None
    network_dropout = config.network_dropout
    if network_dropout is not None:
        try:
            parse_probability("network_dropout", network_dropout)
        except ConfigError:
            raise ConfigError(f"network_dropout: {network_dropout!r} must be at least 0 and below 1, like 0.1",
                              setting="network_dropout") from None
    plan = NetworkPlan(kind, network_dim, network_alpha, raw_args=raw)

    if kind == "lycoris":
        from sd_scripts.networks.lycoris_adapter import parse_lycoris_args

        plan.lycoris = parse_lycoris_args(raw, network_dim=network_dim, network_alpha=network_alpha,
                                          network_dropout=network_dropout)
        plan.problems.extend(warnings=plan.lycoris.warnings)
        return plan

    values = plan.values
    values["conv_dim"] = parse_int("conv_dim", raw.get("conv_dim"), minimum=0) or None
    values["conv_alpha"] = parse_float("conv_alpha", raw.get("conv_alpha"), minimum=0.0)
    for key in ("dropout", "rank_dropout", "module_dropout"):
        values[key] = parse_probability(key, raw.get(key))
    if network_dropout is not None:
        values["dropout"] = float(network_dropout)  # network_dropout wins, as in kohya
    for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        values[key] = parse_float(key, raw.get(key), above=0.0, example="16")

    family_args = tuple(getattr(family, "lora_network_args", ()) or ())
    unknown = [k for k in raw if k not in _LORA_ARGS and k not in BLOCK_ARG_KEYS and k not in family_args]
    if family_args:
        plan.problems.extend(warnings=family.lora_arg_problems(raw, model_info))
    if family_args and values["conv_dim"]:
        plan.problems.warn(f"network_args: conv_dim does nothing here ({getattr(family, 'name', '')} has no "
                             "convolutions in its transformer blocks); LoCon applies as plain LoRA")
    if kind == "lora":
        unknown = _plan_lora(plan, config, family, unknown)
    else:
        unknown = _plan_dylora(plan, unknown)
    if unknown:
        plan.problems.warn(f"network_args not used by {config.network_module}: {', '.join(unknown)}")
    return plan


def _plan_lora(plan: NetworkPlan, config: TrainConfig, family: Any, unknown: list[str]) -> list[str]:
    """kohya LoRA's block weights and the warnings for network_args it does not use; the keys still unknown."""
    raw, values, network_dim, network_alpha = plan.raw_args, plan.values, plan.network_dim, plan.network_alpha
    layout = layout_for_family(_family_hint(config, family))
    plan.blocks = resolve_block_settings(raw, layout, network_dim, network_alpha, values["conv_dim"],
                                         values["conv_alpha"])
    if plan.blocks is not None:
        plan.problems.extend(warnings=plan.blocks.warnings)
        if config.network_train_text_encoder_only:
            plan.problems.warn("network_args: block weights apply to the UNet, which is not trained "
                                 "(network_train_text_encoder_only)")
    if "unit" in unknown:
        unknown.remove("unit")
        plan.problems.warn("network_args: unit is a DyLoRA setting and does nothing with networks.lora; "
                             "set network_module to networks.dylora for DyLoRA")
    lyco = [k for k in unknown if k in _LYCORIS_ONLY]
    if lyco:
        unknown = [k for k in unknown if k not in _LYCORIS_ONLY]
        plan.problems.warn(f"network_args: {', '.join(lyco)}: LyCORIS only, ignored by networks.lora; "
                             "set network_module to lycoris.kohya for LyCORIS")
    return unknown


def _plan_dylora(plan: NetworkPlan, unknown: list[str]) -> list[str]:
    """DyLoRA's ``unit`` and what kohya's DyLoRA refuses or ignores; the keys still unknown."""
    raw, values, network_dim = plan.raw_args, plan.values, plan.network_dim
    unknown = [k for k in unknown if k != "unit"]
    plan.unit = parse_int("unit", raw.get("unit"), minimum=1) or 1
    if network_dim % plan.unit:
        raise ConfigError(f"network_args: unit={raw.get('unit')} must divide network_dim {network_dim}; "
                          "pick a unit that divides it (unit=1 always works)", setting="network_args")
    if values["conv_dim"] is not None and values["conv_dim"] != network_dim:
        raise ConfigError(f"network_args: conv_dim={values['conv_dim']} must equal network_dim {network_dim} for "
                          "DyLoRA (as kohya); set them to the same value", setting="network_args")
    dropped = [k for k in ("dropout", "rank_dropout", "module_dropout") if values.get(k)]
    if dropped:
        plan.problems.warn(f"DyLoRA does not support {', '.join(dropped)} (as kohya); ignored")
        for k in dropped:
            values[k] = None
    block_keys = [k for k in raw if k in BLOCK_ARG_KEYS]
    if block_keys:
        plan.problems.warn(f"network_args: {', '.join(block_keys)} work with networks.lora only; "
                             "networks.dylora ignores them")
    return unknown


def check_network_settings(config: TrainConfig, family: Any = None, problems: Problems | None = None,
                           model_info: dict | None = None) -> list[str]:
    """Preflight check of the network settings: raises ConfigError (one line naming the setting) for an
    unknown network_module or algo, a bad network_args value, a block-weight list of the wrong length,
    an unknown preset, FLUX.1 block indices past the model's blocks (``model_info``)...; returns warnings (also
    recorded in ``problems``). Cheap: no torch, lycoris or model is loaded."""
    warnings = plan_network(config, family, model_info).warnings
    if problems is not None:
        problems.extend(warnings=warnings)
    return warnings


def build_network(config: TrainConfig, model, *, train_unet: bool, train_text_encoder: bool) -> BuiltNetwork:
    """Create, apply and (if asked) load the network for ``config`` on ``model`` (a LoadedModel)."""
    family = model.family
    plan = plan_network(config, family)
    weights_sd = None
    if config.network_weights:
        from sd_scripts.files.lora_file import load_lora_file

        weights_sd, _ = load_lora_file(config.network_weights)
    from_weights = weights_sd is not None and bool(config.dim_from_weights)
    targets = family.lora_targets(plan.raw_args, model, from_weights=from_weights)
    count = _text_encoder_count(targets, family, model, weights_sd if from_weights else None)
    te_prefixes = tuple(family.te_lora_prefixes)[:count]
    text_encoders = list(model.text_encoders)[:count]
    path_map_of = getattr(family, "lora_unet_path_map", None)
    unet_path_map = path_map_of(model.unet) if path_map_of is not None else None

    if plan.kind == "lycoris":
        network, more = _build_lycoris(plan, config, model, weights_sd, train_unet, train_text_encoder, te_prefixes,
                                       unet_path_map, text_encoders)
        plan.problems.extend(warnings=more)
    else:
        values = plan.values
        common = dict(
            network_dim=plan.network_dim, network_alpha=plan.network_alpha,
            conv_dim=values["conv_dim"], conv_alpha=values["conv_alpha"],
            train_unet=train_unet, train_text_encoder=train_text_encoder, te_prefixes=te_prefixes,
            weights_sd=weights_sd if config.dim_from_weights else None, unet_path_map=unet_path_map,
            loraplus_lr_ratio=values["loraplus_lr_ratio"], loraplus_unet_lr_ratio=values["loraplus_unet_lr_ratio"],
            loraplus_text_encoder_lr_ratio=values["loraplus_text_encoder_lr_ratio"],
        )
        if plan.kind == "dylora":
            from sd_scripts.networks.dylora import create_dylora_network

            network = create_dylora_network(model.unet, text_encoders, unit=plan.unit, targets=targets, **common)
        else:
            from sd_scripts.networks.lora import create_network

            network = create_network(model.unet, text_encoders, dropout=values["dropout"],
                                     rank_dropout=values["rank_dropout"], module_dropout=values["module_dropout"],
                                     blocks=plan.blocks, targets=targets, module_factory=_split_factory(targets),
                                     **common)
        network.apply_to()
        if weights_sd is not None and not config.dim_from_weights:
            network.load_kohya_state_dict(weights_sd)
    if not network.loras:
        raise ConfigError("network_args: the settings leave no layer to train (every block rank or lr weight is 0?); "
                          "check block_dims / *_lr_weight", setting="network_args")
    return BuiltNetwork(network, plan.network_dim, plan.network_alpha, plan.raw_args, list(plan.warnings))


def _text_encoder_count(targets, family, model, weights_sd) -> int:
    """How many of the model's text encoders (in order) may get modules: the family's choice (FLUX.1: T5 only with
    train_t5xxl), and with ``dim_from_weights`` (``weights_sd``) up to the last one the file has modules for, as kohya
    reads train_t5xxl from the file."""
    count = targets.text_encoders if targets.text_encoders is not None else len(model.text_encoders)
    if weights_sd is not None:
        from sd_scripts.files.lora_keys import prefix_of, split_key

        in_file = {prefix_of(split_key(key)[0]) for key in weights_sd}
        prefixes = list(family.te_lora_prefixes)
        count = max([count] + [i + 1 for i, prefix in enumerate(prefixes) if prefix in in_file])
    return count


def _split_factory(targets):
    """Modules for kohya's split_qkv: a fused projection gets one LoRA per part (``SplitLoRAModule``)."""
    if targets.split_for is None:
        return None
    from sd_scripts.networks.lora import LoRAModule
    from sd_scripts.networks.lora_split import SplitLoRAModule

    def make(name, layer, **kwargs):
        split = targets.split_for(name)
        return SplitLoRAModule(name, layer, split, **kwargs) if split else LoRAModule(name, layer, **kwargs)

    make.split_for = targets.split_for  # create_network reads a file's fused ranks as parts x rank
    return make


def _build_lycoris(plan, config: TrainConfig, model, weights_sd, train_unet, train_te, te_prefixes, unet_path_map,
                   text_encoders=None):
    from sd_scripts.networks.lycoris_adapter import create_lycoris_network, lycoris_network_from_weights

    text_encoders = list(model.text_encoders) if text_encoders is None else text_encoders

    if weights_sd is not None and config.dim_from_weights:
        network, warnings = lycoris_network_from_weights(
            weights_sd, model.unet, text_encoders, plan.lycoris, train_unet=train_unet,
            train_text_encoder=train_te, te_prefixes=te_prefixes, unet_path_map=unet_path_map)
        if network is not None:
            network.apply_to()
            network.load_kohya_state_dict(weights_sd)
            return network, warnings
    network, warnings = create_lycoris_network(
        model.unet, text_encoders, plan.lycoris, network_dim=plan.network_dim, network_alpha=plan.network_alpha,
        train_unet=train_unet, train_text_encoder=train_te, te_prefixes=te_prefixes, unet_path_map=unet_path_map)
    network.apply_to()
    if weights_sd is not None:
        network.load_kohya_state_dict(weights_sd)
    return network, warnings
