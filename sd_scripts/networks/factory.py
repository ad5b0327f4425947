"""Build the trainable network a run asks for (``network_module`` + ``network_args``).

The training loop calls :func:`build_network` and only uses the returned network's common
interface (``apply_to``, ``prepare_optimizer_params``, ``kohya_state_dict``, ``train``/``eval``),
so adding a network kind never touches the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BuiltNetwork", "build_network"]


@dataclass
class BuiltNetwork:
    network: object
    network_dim: object
    network_alpha: object
    network_args: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def build_network(config, model, *, train_unet: bool, train_text_encoder: bool) -> BuiltNetwork:
    """Create, apply and (if asked) load the network for ``config`` on ``model`` (a LoadedModel)."""
    from .lora import create_network, parse_network_args, split_network_args

    warnings: list[str] = []
    net_args, unknown_args = parse_network_args(config.network_args)
    if unknown_args:
        warnings.append(f"network_args not used by {config.network_module}: {', '.join(unknown_args)}")
    network_dim = config.network_dim or 4
    network_alpha = config.network_alpha
    weights_sd = None
    if config.network_weights:
        from ..library.lora_file import load_lora_file

        weights_sd, _ = load_lora_file(config.network_weights)
    network = create_network(
        model.unet, model.text_encoders, network_dim=network_dim, network_alpha=network_alpha,
        conv_dim=net_args.get("conv_dim"), conv_alpha=net_args.get("conv_alpha"),
        dropout=config.network_dropout if config.network_dropout is not None else net_args.get("dropout"),
        rank_dropout=net_args.get("rank_dropout"), module_dropout=net_args.get("module_dropout"),
        train_unet=train_unet, train_text_encoder=train_text_encoder, te_prefixes=tuple(model.family.te_lora_prefixes),
        weights_sd=weights_sd if config.dim_from_weights else None,
    )
    network.apply_to()
    if weights_sd is not None and not config.dim_from_weights:
        network.load_kohya_state_dict(weights_sd)
    return BuiltNetwork(network, network_dim, network_alpha, split_network_args(config.network_args), warnings)
