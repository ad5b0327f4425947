"""LyCORIS networks (``network_module = lycoris.kohya``) through lycoris-lora 4.x.

:func:`parse_lycoris_args` turns kohya's string ``network_args`` into the real values LyCORIS
should see (:mod:`.lycoris_args`; no torch import, so preflight uses it); :func:`create_lycoris_network` builds the
network with ``lycoris.kohya.create_network`` (presets and LyCORIS's own state: :mod:`.lycoris_presets`) and wraps it
in :class:`LycorisNetworkAdapter` (:mod:`.lycoris_network`), which gives it the engine's network interface and writes
the file layout A1111, ComfyUI and LyCORIS read. This module builds networks and keeps the old import paths.

What this layer fixes or decides (lycoris-lora 4.1.3's behaviour, checked by ``tests/test_lycoris_networks.py``):

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

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from sd_scripts.core.errors import ConfigError
from sd_scripts.core.problems import Problems
from sd_scripts.files import lora_keys
from sd_scripts.networks.lycoris_args import (
    LORAPLUS_ARGS, LYCORIS_ALGOS, LYCORIS_PRESETS, NETWORK_MODULE, PROBABILITY_ARGS, LycorisArgs, parse_lycoris_args,
    read_preset_file,
)
from sd_scripts.networks.lycoris_presets import builtin_preset, import_lycoris, lycoris_preset, resolve_preset
from sd_scripts.networks.network_args import SETTING, bad_arg

__all__ = [
    "NETWORK_MODULE", "LYCORIS_ALGOS", "LYCORIS_PRESETS", "LycorisArgs", "parse_lycoris_args", "read_preset_file",
    "builtin_preset", "lycoris_preset", "create_lycoris_network", "LycorisNetworkAdapter", "lycoris_names",
    "file_to_lycoris_names", "to_lycoris_state_dict", "lycoris_network_from_weights",
]

_TORCH_NAMES = ("LycorisNetworkAdapter", "lycoris_names", "file_to_lycoris_names", "to_lycoris_state_dict")


def __getattr__(name: str):
    # The network class and the name maps need torch; they are imported on first use so that importing this module
    # (for parse_lycoris_args in preflight) stays cheap.
    if name in _TORCH_NAMES:
        from sd_scripts.networks import lycoris_network

        return getattr(lycoris_network, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _text_encoder_arg(text_encoders, train_text_encoder: bool, te_prefixes: Sequence[str]):
    """(the text encoders as a list, what LyCORIS takes: the list with several, the one encoder, or None)."""
    tes = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    te_arg = None
    if train_text_encoder and tes:
        te_arg = tes if len(tuple(te_prefixes)) > 1 else tes[0]
    return tes, te_arg


def lycoris_network_from_weights(state_dict: Mapping[str, Any], unet, text_encoders, args: LycorisArgs, *,
                                 train_unet: bool = True, train_text_encoder: bool = True,
                                 te_prefixes: Sequence[str] = (lora_keys.PREFIX_TE,), unet_path_map=None):
    """A LyCORIS network with exactly the modules, algorithms and ranks of a file (``dim_from_weights``),
    built by ``lycoris.kohya.create_network_from_weights``; weights not loaded. Returns
    ``(adapter, warnings)``, or ``(None, warnings)`` for IA3 files, which that function cannot read
    (the caller then builds from the settings)."""
    from sd_scripts.networks.lycoris_network import LycorisNetworkAdapter, file_to_lycoris_names, to_lycoris_state_dict

    kohya, _ = import_lycoris()
    if any(key.endswith(".on_input") for key in state_dict):
        return None, ["dim_from_weights: the file is (IA)^3, which has no rank; the network is built from the settings"]
    if args.algo == "dylora":
        return None, ["dim_from_weights: LyCORIS reads DyLoRA files as LoCon; the DyLoRA network is built from the "
                      "settings (network_dim, conv_dim, block_size)"]
    tes, te_arg = _text_encoder_arg(text_encoders, train_text_encoder, te_prefixes)
    names = file_to_lycoris_names(unet, tes, te_prefixes, unet_path_map)
    renamed = to_lycoris_state_dict(state_dict, names)
    records: list[logging.LogRecord] = []
    with lycoris_preset(resolve_preset(args), records):
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
        for key in PROBABILITY_ARGS:
            if key in args.kwargs and hasattr(lora, key):
                setattr(lora, key, args.kwargs[key])
    loraplus = {k: args.kwargs[k] for k in LORAPLUS_ARGS if args.kwargs.get(k) is not None}
    algo = args.algo
    adapter = LycorisNetworkAdapter(net, unet, te_arg, train_unet=train_unet, train_text_encoder=train_text_encoder,
                               te_prefixes=te_prefixes, unet_path_map=unet_path_map, algo=algo, loraplus=loraplus)
    return adapter, [f"LyCORIS: {r.getMessage().splitlines()[0]}" for r in records]


def create_lycoris_network(unet, text_encoders, args: LycorisArgs, *, network_dim: int | None, network_alpha: float | None,
                           train_unet: bool = True, train_text_encoder: bool = True,
                           te_prefixes: Sequence[str] = (lora_keys.PREFIX_TE,), unet_path_map=None,
                           multiplier: float = 1.0):
    """Build (not apply) a LyCORIS network for ``unet`` / ``text_encoders`` with parsed ``args``.

    Returns ``(adapter, warnings)``. A preset that targets no module of the parts being trained
    raises ConfigError naming network_args."""
    from sd_scripts.networks.lycoris_network import LycorisNetworkAdapter

    kohya, _ = import_lycoris()
    tes, te_arg = _text_encoder_arg(text_encoders, train_text_encoder, te_prefixes)
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    kwargs = dict(args.kwargs)
    loraplus = {k: kwargs.get(k) for k in LORAPLUS_ARGS if kwargs.get(k) is not None}
    preset = resolve_preset(args)
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
    found = Problems()
    found.extend(warnings=args.warnings)
    seen: set[str] = set()
    for record in records:
        text = record.getMessage().splitlines()[0]
        if text.startswith("It is recommended to use preset ia3"):
            continue  # LyCORIS compares our private preset name; parse_lycoris_args has its own warning
        if text not in seen:
            seen.add(text)
            found.warn(f"LyCORIS: {text}")
    n_te = len(net.text_encoder_loras) if train_text_encoder else 0
    n_unet = len(net.unet_loras) if train_unet else 0
    if n_te + n_unet == 0:
        parts = " and ".join(p for p, on in (("UNet", train_unet), ("text encoder", train_text_encoder)) if on)
        raise ConfigError(f"{SETTING}: preset={args.preset} adapts no layer of the {parts}; pick another preset "
                          f"(e.g. {'full' if args.preset != 'full' else 'attn-mlp'})", setting=SETTING)
    if train_unet and n_unet == 0:
        found.warn(f"network_args: preset={args.preset} adapts no UNet layer; only the text encoder trains")
    if train_text_encoder and te_arg is not None and n_te == 0:
        found.warn(f"network_args: preset={args.preset} adapts no text-encoder layer; only the UNet trains")
    adapter = LycorisNetworkAdapter(net, unet, te_arg, train_unet=train_unet, train_text_encoder=train_text_encoder,
                               te_prefixes=te_prefixes, unet_path_map=unet_path_map, algo=args.algo, loraplus=loraplus)
    return adapter, found.warnings
