"""The LyCORIS network the engine trains: :class:`LycorisNetworkAdapter` wraps lycoris-lora's ``LycorisNetworkKohya``
with the engine's network interface (:class:`sd_scripts.networks.trainable.TrainableNetwork`), writes the file layout
A1111, ComfyUI and LyCORIS read, and loads such files back; and the module names between LyCORIS and the files.

Imports torch: :mod:`.lycoris_adapter` imports it only when a network is built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sd_scripts.core.errors import ConfigError
from sd_scripts.files import lora_keys
from sd_scripts.networks.lora import build_param_groups
from sd_scripts.networks.lycoris_presets import lycoris_logs

__all__ = ["LycorisNetworkAdapter", "lycoris_names", "file_to_lycoris_names", "to_lycoris_state_dict"]


class LycorisNetworkAdapter(nn.Module):
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

        mapped, unexpected, file_modules = self._file_tensors(state_dict)
        self._check_file_fits(mapped, file_modules, setting)
        missing_modules = sorted(self._to_file[n] for n in self._to_file if n not in file_modules)
        self._load_mapped(mapped)
        result = LoadResult(missing=missing_modules, unexpected=unexpected)
        if strict and (result.missing or result.unexpected):
            detail = (f"has {len(result.unexpected)} tensors this network lacks (e.g. {result.unexpected[0]})"
                      if result.unexpected else
                      f"lacks {len(result.missing)} modules of this network (e.g. {result.missing[0]})")
            raise ConfigError(f"{setting}: the file {detail}; use the settings it was trained with", setting=setting)
        return result

    def _file_tensors(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, list[str], set[str]]:
        """(the file's tensors under this network's module names, the file's keys of no module here, the modules
        the file has)."""
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
        return mapped, unexpected, file_modules

    def _check_file_fits(self, mapped: dict, file_modules: set[str], setting: str) -> None:
        """Every tensor of the file has its place and shape in this network, and every module it has is whole."""
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
        missing_in_module = sorted(k for k in own if k.partition(".")[0] in file_modules and k not in mapped)
        if missing_in_module:
            name, _, part = missing_in_module[0].partition(".")
            raise ConfigError(f"{setting}: module {self._to_file.get(name, name)} lacks {part}; set algo "
                              "(and use_tucker, dora_wd) to the file's", setting=setting)

    def _load_mapped(self, mapped: dict) -> None:
        """Copy the checked tensors in (DyLoRA module by module, the rest through LyCORIS's own load)."""
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
