"""Convert a bmaltais/kohya_ss GUI LoRA config (JSON) into ArgStore settings.

The GUI saves its form as one flat object. Its quirks, which the 2023 tool's name map got wrong:
numbers are often strings ("1e-4", "64") or floats where integers are meant (``64.0``); ``""``
means "not set"; ``lr_warmup`` is a percentage of the steps; ``optimizer`` and ``seed`` have their
own names; ``max_resolution`` is "W,H"; the network kind is ``LoRA_type`` with ``conv_dim`` and
``conv_alpha`` beside it; ``optimizer_args`` is one string of ``key=value`` pairs; ``sample_prompts``
holds the prompt text itself; ``additional_parameters`` is a string of extra command-line flags.
Where the GUI uses 0 for "off" (sample and save intervals, min SNR gamma, per-part learning
rates, adaptive noise scale, ip noise gamma, v-pred-like loss, max-norm) 0 becomes unset. ``sdxl`` is taken as it is; ``sdxl_no_half_vae`` and ``sdxl_cache_text_encoder_outputs``
become ``no_half_vae`` and ``cache_text_encoder_outputs`` while ``sdxl`` is ticked (the GUI ignores them otherwise).
Keys with no use here are listed in one warning.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import tempfile
from typing import Any

from sd_scripts.core.problems import Problems
from sd_scripts.core.settings import front_settings

from .fields import SettingInfo, parse_bool, parse_key_values
from .loaded_settings import LoadedSettings, coerce_file_values

__all__ = ["convert_kohya_ss", "RENAMED_KEYS", "LORA_TYPES"]

# kohya_ss key -> ArgStore name, for keys whose ArgStore name differs (declared with each setting). Keys that
# share the ArgStore name (v2, cache_latents, clip_skip, ...) are taken as they are.
RENAMED_KEYS = {key: s.name for s in front_settings() for key in s.gui_names}

# SDXL options the GUI prefixes with sdxl_ and applies only while its SDXL box is ticked.
_SDXL_KEYS = {"sdxl_no_half_vae": "no_half_vae", "sdxl_cache_text_encoder_outputs": "cache_text_encoder_outputs"}

# Settings where the GUI writes 0 to mean "off / not given".
_ZERO_IS_UNSET = {s.name for s in front_settings() if s.gui_zero_unset}

# LoRA_type -> (lyco, algo or None, uses conv_dim/conv_alpha)
LORA_TYPES = {
    "Standard": (False, None, False),
    "Kohya LoCon": (False, None, True),
    "Kohya DyLoRA": (False, None, True),
    "LoCon": (True, "locon", True),
    "LyCORIS/LoCon": (True, "locon", True),
    "LyCORIS/LoHa": (True, "loha", True),
    "LyCORIS/LoKr": (True, "lokr", True),
    "LyCORIS/iA3": (True, "ia3", False),
    "LyCORIS/DyLoRA": (True, "dylora", True),
    "LyCORIS/Native Fine-Tuning": (True, "full", False),
    "LyCORIS/Diag-OFT": (True, "diag-oft", False),
    "LyCORIS/GLoRA": (True, "glora", True),
}

# GUI block-weight keys -> network_args keys (kohya networks.lora).
_BLOCK_KEYS = {
    "down_lr_weight": "down_lr_weight",
    "mid_lr_weight": "mid_lr_weight",
    "up_lr_weight": "up_lr_weight",
    "block_lr_zero_threshold": "block_lr_zero_threshold",
    "block_dims": "block_dims",
    "block_alphas": "block_alphas",
    "conv_dims": "conv_block_dims",
    "conv_alphas": "conv_block_alphas",
    "conv_block_dims": "conv_block_dims",
    "conv_block_alphas": "conv_block_alphas",
}

# LyCORIS options of the GUI -> network_args keys, with the value that means "leave it out".
_LYCORIS_KEYS = {
    "factor": ("factor", -1),
    "use_tucker": ("use_tucker", False),
    "use_scalar": ("use_scalar", False),
    "rank_dropout": ("rank_dropout", 0),
    "module_dropout": ("module_dropout", 0),
    "rank_dropout_scale": ("rank_dropout_scale", False),
    "train_norm": ("train_norm", False),
    "decompose_both": ("decompose_both", False),
    "constrain": ("constrain", 0),
    "rescaled": ("rescaled", False),
    "dora_wd": ("dora_wd", False),
    "bypass_mode": ("bypass_mode", False),
    "train_on_input": ("train_on_input", False),
}

# Keys the converter reads itself.
_HANDLED = {"LoRA_type", "conv_dim", "conv_alpha", "unit", "use_cp", "max_resolution", "lr_warmup",
            "optimizer_args", "lr_scheduler_args", "sample_prompts", "additional_parameters", "xformers",
            "noise_offset_type", "noise_offset", "multires_noise_iterations", "multires_noise_discount",
            "use_wandb", "max_train_epochs", *_SDXL_KEYS, "epoch", "LyCORIS_preset", "file_path", "save_as",
            *_BLOCK_KEYS, *_LYCORIS_KEYS}


def _is_unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def _is_off(value: Any) -> bool:
    """Empty, false or zero: a GUI field left at "nothing"."""
    if _is_unset(value) or value is False:
        return True
    if isinstance(value, (list, dict)) and not value:
        return True
    try:
        return float(value) == 0
    except (TypeError, ValueError):
        return False


def _is_neutral(value: Any, neutral: Any) -> bool:
    """True when a GUI option holds its "leave it out" value (compared as numbers where possible)."""
    if _is_unset(value):
        return True
    if neutral in (0, False):
        return _is_off(value)
    try:
        return float(value) == float(neutral)
    except (TypeError, ValueError):
        return False


def _arg_text(value: Any) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _prompt_file(text: str) -> str:
    """Prompt text from the GUI, kept in a temporary file named by its content (nothing else is written)."""
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"lets-kohya-prompts-{digest}.txt")
    if not os.path.isfile(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text.rstrip("\n") + "\n")
        os.replace(tmp, path)
    return path


class _Converter:
    def __init__(self, data: dict, path: str, infos: dict[str, SettingInfo]):
        self.data = data
        self.path = path
        self.name = os.path.basename(path)
        self.infos = infos
        self.raw: dict[str, tuple[Any, str]] = {}
        self.problems = Problems()
        self.ignored: list[str] = []
        self.notes: list[str] = []
        self.network_args: dict[str, str] = {}

    def error(self, key: str, text: str, setting: str | None = None) -> None:
        self.problems.error(setting or key, text, named=key, where=self.name)

    def set(self, name: str, value: Any, key: str) -> None:
        if name in _ZERO_IS_UNSET and _is_off(value):
            return
        self.raw[name] = (value, key)

    def ignore(self, key: str, value: Any) -> None:
        if not _is_off(value):
            self.ignored.append(key)

    def run(self) -> LoadedSettings:
        data = self.data
        for key, value in data.items():
            if key in _HANDLED:
                continue
            target = RENAMED_KEYS.get(key, key)
            if target in self.infos and not self.infos[target].session:
                self.set(target, value, key)
            else:
                self.ignore(key, value)
        self.epochs()
        self.resolution()
        self.warmup()
        self.optimizer_args()
        self.scheduler_args()
        self.attention()
        self.noise()
        self.network()
        self.logging()
        self.samples()
        self.sdxl_options()
        self.additional_parameters()

        values = coerce_file_values(self.raw, self.infos, self.name, self.problems)
        self.problems.raise_errors()
        if self.network_args:
            merged = dict(values.get("network_args") or {})
            merged.update(self.network_args)
            values["network_args"] = merged
        return LoadedSettings(path=os.path.abspath(self.path), fmt="kohya_ss", values=values,
                              ignored=self.ignored, notes=self.notes)

    # ----------------------------------------------------------------- pieces
    def epochs(self) -> None:
        epoch, max_epochs = self.data.get("epoch"), self.data.get("max_train_epochs")
        if not _is_off(max_epochs):
            self.set("num_epochs", max_epochs, "max_train_epochs")
        elif not _is_unset(epoch):
            self.set("num_epochs", epoch, "epoch")

    def resolution(self) -> None:
        value = self.data.get("max_resolution")
        if _is_unset(value):
            return
        parts = [p.strip() for p in str(value).replace("x", ",").split(",") if p.strip()]
        try:
            numbers = [int(float(p)) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (1, 2) or min(numbers, default=0) <= 0:
            self.error("max_resolution", f"expected \"W,H\" in pixels, got {value!r}", "train_resolution")
            return
        width, height = numbers[0], numbers[-1]
        self.raw["train_resolution"] = (width, "max_resolution")
        if height != width:
            self.raw["height_resolution"] = (height, "max_resolution")

    def warmup(self) -> None:
        value = self.data.get("lr_warmup")
        if _is_unset(value):
            return
        try:
            percent = float(value)
        except (TypeError, ValueError):
            self.error("lr_warmup", f"expected a percentage of the steps, got {value!r}", "warmup_lr_ratio")
            return
        if not 0 <= percent <= 100:
            self.error("lr_warmup", f"must be a percentage between 0 and 100, got {value!r}", "warmup_lr_ratio")
            return
        self.raw["warmup_lr_ratio"] = (percent / 100.0, "lr_warmup")

    def _key_values(self, key: str) -> dict[str, str] | None:
        value = self.data.get(key)
        if _is_unset(value):
            return None
        if isinstance(value, dict):
            return {str(k): _arg_text(v) for k, v in value.items()}
        try:
            return parse_key_values(str(value))
        except ValueError as err:
            self.error(key, str(err))
            return None

    def optimizer_args(self) -> None:
        if "optimizer_args" not in self.data:
            return
        # In the GUI an empty box means "no optimizer arguments", not "keep our defaults".
        parsed = self._key_values("optimizer_args")
        self.raw["optimizer_args"] = (parsed or {}, "optimizer_args")

    def scheduler_args(self) -> None:
        parsed = self._key_values("lr_scheduler_args")
        if parsed:
            self.raw["lr_scheduler_args"] = (parsed, "lr_scheduler_args")

    def attention(self) -> None:
        if "xformers" not in self.data:
            return
        value = self.data["xformers"]
        if isinstance(value, str) and value.strip().lower() in ("xformers", "sdpa", "none", ""):
            self.raw["xformers"] = (value.strip().lower() == "xformers", "xformers")
            return
        try:
            self.raw["xformers"] = (parse_bool(value), "xformers")
        except ValueError:
            self.error("xformers", f"expected true/false, xformers, sdpa or none, got {value!r}", "xformers")

    def noise(self) -> None:
        kind = str(self.data.get("noise_offset_type") or "Original").strip().lower()
        if kind not in ("original", "multires"):
            self.error("noise_offset_type", f"expected Original or Multires, got {self.data['noise_offset_type']!r}")
            return
        if kind == "original":
            if not _is_unset(self.data.get("noise_offset")):
                self.set("noise_offset", self.data["noise_offset"], "noise_offset")
        else:
            for key in ("multires_noise_iterations", "multires_noise_discount"):
                if not _is_unset(self.data.get(key)):
                    self.set(key, self.data[key], key)

    def network(self) -> None:
        data = self.data
        lora_type = str(data.get("LoRA_type") or "Standard").strip()
        if lora_type not in LORA_TYPES:
            self.error("LoRA_type", f"{lora_type!r} is not supported; use one of {', '.join(LORA_TYPES)}", "lyco")
            return
        lyco, algo, uses_conv = LORA_TYPES[lora_type]
        self.raw["lyco"] = (lyco, "LoRA_type")
        args = self.network_args
        if algo:
            args["algo"] = algo
        if uses_conv:
            for key in ("conv_dim", "conv_alpha"):
                value = data.get(key)
                if _is_off(value):
                    continue
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    self.error(key, f"expected a number, got {value!r}", "network_args")
                    continue
                args[key] = _arg_text(number)
        if lora_type in ("Kohya DyLoRA", "LyCORIS/DyLoRA") and not _is_off(data.get("unit")):
            args["unit"] = _arg_text(data["unit"])
        if lyco:
            if not _is_off(data.get("use_cp")):
                args["use_conv_cp"] = "True"
            for key, (arg, neutral) in _LYCORIS_KEYS.items():
                value = data.get(key)
                if not _is_neutral(value, neutral):
                    args[arg] = _arg_text(value)
            preset = data.get("LyCORIS_preset")
            if not _is_unset(preset) and str(preset).strip().lower() != "full":
                args["preset"] = str(preset).strip()
            for key in _BLOCK_KEYS:
                self.ignore(key, data.get(key))
        else:
            for key in _LYCORIS_KEYS:
                self.ignore(key, data.get(key))
            self.ignore("use_cp", data.get("use_cp"))
            for key, arg in _BLOCK_KEYS.items():
                if not _is_unset(data.get(key)):
                    args[arg] = _arg_text(data[key])

    def sdxl_options(self) -> None:
        """``sdxl_no_half_vae`` / ``sdxl_cache_text_encoder_outputs``: used while ``sdxl`` is ticked, as in the GUI."""
        try:
            sdxl = not _is_unset(self.data.get("sdxl")) and parse_bool(self.data["sdxl"])
        except ValueError:
            sdxl = False  # the sdxl key itself is reported as a bad value
        for key, target in _SDXL_KEYS.items():
            if key not in self.data:
                continue
            if not sdxl:
                self.ignore(key, self.data[key])
            elif target not in self.raw or _is_off(self.raw[target][0]):
                self.set(target, self.data[key], key)

    def logging(self) -> None:
        if not _is_off(self.data.get("use_wandb")):
            self.raw["log_with"] = ("wandb", "use_wandb")

    def samples(self) -> None:
        value = self.data.get("sample_prompts")
        if _is_unset(value):
            return
        text = str(value)
        if "\n" not in text and os.path.isfile(text.strip()):
            self.raw["sample_prompts"] = (text.strip(), "sample_prompts")
            return
        self.raw["sample_prompts"] = (_prompt_file(text), "sample_prompts")
        self.notes.append(f"{self.name}: the sample prompts written in the file are used as the prompt list")

    def additional_parameters(self) -> None:
        text = self.data.get("additional_parameters")
        if _is_unset(text):
            return
        try:
            tokens = shlex.split(str(text))
        except ValueError:
            self.ignored.append(f"additional_parameters {text!r}")
            return
        reverse = {kohya: ours for kohya, ours in RENAMED_KEYS.items()}
        i = 0
        while i < len(tokens):
            token = tokens[i]
            i += 1
            if not token.startswith("--"):
                self.ignored.append(f"additional_parameters {token}")
                continue
            flag, sep, value = token[2:].partition("=")
            target = reverse.get(flag, flag)
            info = self.infos.get(target)
            if not sep:
                takes_value = info is not None and info.kind != "bool"
                if i < len(tokens) and not tokens[i].startswith("--") and (takes_value or info is None):
                    value = tokens[i]
                    i += 1
                elif info is not None and info.kind == "bool":
                    value = "true"
            if info is None or info.session:
                self.ignored.append(f"additional_parameters --{flag}")
                continue
            self.raw[target] = (value, f"additional_parameters --{flag}")


def convert_kohya_ss(data: dict, path: str, infos: dict[str, SettingInfo]) -> LoadedSettings:
    """Convert a kohya_ss GUI config; raise UserErrors listing every value that cannot be used."""
    return _Converter(data, path, infos).run()
