"""Natural-language captions from a transformers image-to-text model (loaded natively: no remote code).

:func:`load_caption_model` takes a Hugging Face repo id (downloaded once into the Hugging Face cache; offline, a
model that is not cached is one line naming the setting) or a local folder, checks that transformers loads its
architecture natively as an image-to-text model (``AutoModelForImageTextToText``: Florence-2, BLIP, LLaVA models
such as JoyCaption, Qwen2.5-VL, SmolVLM, GIT, vision-encoder-decoder...) and returns a :class:`CaptionModel`.

Three ways of asking, chosen from the architecture:

* ``task`` (Florence-2): the prompt is a task token, ``<CAPTION>``, ``<DETAILED_CAPTION>`` (default) or
  ``<MORE_DETAILED_CAPTION>``;
* ``chat`` (LLaVA, Qwen2.5-VL, SmolVLM and every model whose processor has a chat template): the prompt is the
  user's message next to the image, in the model's own chat template; only the answer is kept;
* ``plain`` (BLIP, GIT, vision-encoder-decoder): no prompt by default (BLIP continues a prompt such as "a photo
  of"; the prompt itself is dropped from the caption).

:meth:`CaptionModel.caption` captions a batch of PIL images (greedy or beam search, no sampling: the same image
gives the same caption).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from sd_scripts.core.errors import ConfigError, ModelLoadError

__all__ = ["DEFAULT_MODEL", "DEFAULT_PROMPTS", "CaptionModel", "load_caption_model", "model_folder", "prompt_style"]

# Florence-2 large (0.77B parameters, transformers-native weights): about 2 GB of VRAM in half precision, a few
# seconds an image on a CPU; detailed captions in plain English.
DEFAULT_MODEL = "florence-community/Florence-2-large"
DEFAULT_PROMPTS = {
    "task": "<DETAILED_CAPTION>",
    "chat": "Write one detailed paragraph describing this image for a text-to-image training caption: the subject, "
            "their appearance and pose, clothing, the setting, the composition, lighting and style. Write only the "
            "caption.",
    "plain": "",
}
_TASK_MODELS = {"florence2"}
_PLAIN_MODELS = {"blip", "git", "vision-encoder-decoder", "pix2struct"}
_DOWNLOAD = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_NATIVE_EXAMPLES = ("florence-community/Florence-2-large, Salesforce/blip-image-captioning-large, "
                    "fancyfeast/llama-joycaption-beta-one-hf-llava, Qwen/Qwen2.5-VL-3B-Instruct, "
                    "HuggingFaceTB/SmolVLM-Instruct")


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _is_repo_id(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and ".." not in text


def model_folder(model: str, setting: str = "model") -> str:
    """The local folder of ``model``: itself when it is a folder, else the Hugging Face cache's snapshot of the repo
    id (downloaded once; the weights as safetensors, configs, tokenizer and chat template files)."""
    if not model or not str(model).strip():
        raise ConfigError(f"{setting}: missing; give a Hugging Face repo id (e.g. {DEFAULT_MODEL}) or a model folder",
                          setting=setting)
    path = os.path.expanduser(str(model).strip())
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ConfigError(f"{setting}: '{model}' is a file; give a model folder (config.json and the weights) or a "
                          f"Hugging Face repo id such as {DEFAULT_MODEL}", setting=setting)
    if not _is_repo_id(path):
        raise ConfigError(f"{setting}: '{model}' is neither a folder nor a Hugging Face repo id (owner/name); check it, "
                          f"e.g. {DEFAULT_MODEL}", setting=setting)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    how = f"run once online, or download it on a connected machine with `hf download {path}` (or give a local folder)"
    try:
        return snapshot_download(path, allow_patterns=_DOWNLOAD, local_files_only=True)
    except LocalEntryNotFoundError:
        if _offline():
            raise ModelLoadError(f"{setting}: '{model}' is not in the Hugging Face cache and HF_HUB_OFFLINE is set, so "
                                 f"nothing is downloaded; {how}", setting=setting) from None
    try:
        return snapshot_download(path, allow_patterns=_DOWNLOAD)
    except (GatedRepoError, RepositoryNotFoundError):
        raise ModelLoadError(f"{setting}: '{model}' is not a Hugging Face repository you can read; check the name (e.g. "
                             f"{DEFAULT_MODEL}), or log in with `hf auth login` for a gated one", setting=setting) from None
    except (LocalEntryNotFoundError, OSError) as e:
        raise ModelLoadError(f"{setting}: '{model}' is not in the Hugging Face cache and could not be downloaded "
                             f"({type(e).__name__}); {how}", setting=setting) from None


def _read_config(folder: str, model: str, setting: str) -> dict:
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{setting}: '{model}' has no config.json; give a transformers model folder or repo id "
                             f"(e.g. {DEFAULT_MODEL})", setting=setting) from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{setting}: the config.json of '{model}' cannot be read ({type(e).__name__}); fix or "
                             "download it again", setting=setting) from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{setting}: the config.json of '{model}' is not a JSON object", setting=setting)
    return config


def _check_architecture(config: dict, model: str, setting: str) -> str:
    """The config's model type, when transformers loads it natively as an image-to-text model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    kind = config.get("model_type")
    if kind in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and not config.get("auto_map"):
        return kind
    why = (f"needs its own Python code (auto_map: trust_remote_code), which this tool does not run"
           if config.get("auto_map") else
           f"is a {kind or 'unknown'} model, which transformers does not load as an image-to-text model")
    raise ModelLoadError(f"{setting}: '{model}' {why}; use a transformers-native captioner such as {_NATIVE_EXAMPLES}",
                         setting=setting)


def prompt_style(model_type: str, processor: Any) -> str:
    """``task``, ``chat`` or ``plain`` (see the module docstring)."""
    if model_type in _TASK_MODELS:
        return "task"
    if model_type not in _PLAIN_MODELS and getattr(processor, "chat_template", None):
        return "chat"
    return "plain"


def _device_and_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA GPU is visible; use --device cpu", setting="device")
    if dtype == "auto":
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    return device, getattr(torch, dtype)


@dataclass
class CaptionModel:
    """A loaded captioner: ``caption(images)`` -> one caption per PIL image."""

    name: str
    model: Any
    processor: Any
    style: str
    prompt: str
    device: str
    dtype: Any
    max_new_tokens: int = 150
    num_beams: int = 3

    def _inputs(self, images: list) -> dict:
        if self.style == "chat":
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            return self.processor(text=[text] * len(images), images=images, return_tensors="pt", padding=True)
        if self.prompt:
            return self.processor(text=[self.prompt] * len(images), images=images, return_tensors="pt", padding=True)
        return self.processor(images=images, return_tensors="pt")

    def caption(self, images: list) -> list[str]:
        import torch

        inputs = self._inputs(images)
        inputs = {k: (v.to(self.device, self.dtype) if torch.is_floating_point(v) else v.to(self.device))
                  if hasattr(v, "to") else v for k, v in inputs.items()}
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self._new_tokens(inputs), num_beams=self.num_beams,
                                      do_sample=False)
        if self.style == "chat":  # a decoder-only model returns the prompt first
            out = out[:, inputs["input_ids"].shape[1]:]
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [self._clean(t) for t in texts]

    def _new_tokens(self, inputs: dict) -> int:
        """``max_new_tokens``, less where the model's text positions would run out (a prompt already uses some)."""
        config = self.model.config
        # a transformers model config: which of these it has depends on the architecture
        limit = getattr(getattr(config, "text_config", None) or config, "max_position_embeddings", None)
        if not limit:
            return self.max_new_tokens
        used = inputs["input_ids"].shape[1] if "input_ids" in inputs else 1
        return max(1, min(self.max_new_tokens, int(limit) - used))

    def _clean(self, text: str) -> str:
        text = " ".join(str(text).split())
        if self.style == "plain" and self.prompt:  # BLIP repeats its prompt
            start = " ".join(self.prompt.split())
            if text.lower().startswith(start.lower()):
                text = text[len(start):].strip()
        return text


def load_caption_model(model: str = DEFAULT_MODEL, *, prompt: str | None = None, device: str = "auto",
                       dtype: str = "auto", max_new_tokens: int = 150, num_beams: int = 3,
                       setting: str = "model") -> CaptionModel:
    """Load the captioner ``model`` (repo id or folder; see the module docstring). ``prompt`` None: the default of
    the model's prompt style. One-line ModelLoadError/ConfigError naming ``setting`` when it cannot be used."""
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ConfigError(f"device: {device!r} is not a device; use auto, cpu or cuda", setting="device")
    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise ConfigError(f"dtype: {dtype!r}; use auto, float32, float16 or bfloat16", setting="dtype")
    folder = model_folder(model, setting)
    kind = _check_architecture(_read_config(folder, model, setting), model, setting)
    device, torch_dtype = _device_and_dtype(device, dtype)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(folder)
        network, info = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch_dtype, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a folder it cannot read
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ModelLoadError(f"{setting}: '{model}' cannot be loaded with transformers ({type(e).__name__}: {first}); "
                             "check that the folder is complete (download it again) and is an image-to-text model",
                             setting=setting) from None
    if info.get("missing_keys"):
        raise ModelLoadError(f"{setting}: '{model}' lacks {len(info['missing_keys'])} weights of its architecture "
                             f"(e.g. {sorted(info['missing_keys'])[0]}): not a transformers-native checkpoint; use e.g. "
                             f"{_NATIVE_EXAMPLES}", setting=setting)
    style = prompt_style(kind, processor)
    if style == "chat":
        processor.tokenizer.padding_side = "left"  # batched generation continues every prompt at its end
    network.to(device).eval()
    return CaptionModel(name=str(model), model=network, processor=processor, style=style,
                        prompt=DEFAULT_PROMPTS[style] if prompt is None else prompt, device=device, dtype=torch_dtype,
                        max_new_tokens=max_new_tokens, num_beams=num_beams)
