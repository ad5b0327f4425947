"""WD14-style taggers (SmilingWolf's v2 and v3: ViT, SwinV2, ConvNeXt, MOAT, EVA02) run with onnxruntime.

A tagger is published as a Hugging Face repository (or a local folder) holding ``model.onnx`` and
``selected_tags.csv`` (columns ``tag_id,name,category,count``; category 9 = rating, 0 = general,
4 = character). The model takes one NHWC float32 image batch and returns one sigmoid
probability per row of the CSV.

* :func:`find_model_files`: ``--model_dir`` (the two files, or kohya's ``<model_dir>/<repo id with
  _ for />`` download folder) or ``--repo_id`` from the Hugging Face cache, downloaded there once
  when it is missing (not when ``HF_HUB_OFFLINE`` is set: then one line says how to get it).
* :func:`read_labels`: the CSV.
* :func:`prepare_image`: the model author's preprocessing (the reference demo of the v3 models):
  transparency composited on white, padded to a centred square with white, resized with bicubic
  filtering to the model's input size (read from the ONNX input shape), RGB turned to BGR, pixel
  values 0-255 as float32.
* :class:`WD14Tagger`: the onnxruntime session (CUDA when its provider is available, the CPU
  otherwise) that turns a batch of prepared images into probabilities.
* :func:`mcut_threshold`: the automatic threshold of the demo (MCut: the middle of the largest
  gap between sorted probabilities).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..core.errors import ConfigError, ModelLoadError

__all__ = [
    "MODEL_FILE",
    "LABELS_FILE",
    "DEFAULT_REPO",
    "KOHYA_DEFAULT_REPO",
    "RATING",
    "GENERAL",
    "CHARACTER",
    "Label",
    "find_model_files",
    "read_labels",
    "prepare_image",
    "mcut_threshold",
    "WD14Tagger",
]

MODEL_FILE = "model.onnx"
LABELS_FILE = "selected_tags.csv"
DEFAULT_REPO = "SmilingWolf/wd-swinv2-tagger-v3"
KOHYA_DEFAULT_REPO = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
RATING, GENERAL, CHARACTER = 9, 0, 4
_FILES = (MODEL_FILE, LABELS_FILE)


@dataclass(frozen=True)
class Label:
    """One row of ``selected_tags.csv``."""

    name: str
    category: int


# --------------------------------------------------------------------------------------------- files


def _has_files(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, f)) for f in _FILES)


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _from_model_dir(model_dir: str, repo_id: str) -> tuple[str, str]:
    if not os.path.isdir(model_dir):
        what = "is a file" if os.path.exists(model_dir) else "does not exist"
        raise ConfigError(f"model_dir: '{model_dir}' {what}; give the folder that holds {MODEL_FILE} and {LABELS_FILE}, "
                          "or leave out --model_dir to use --repo_id", setting="model_dir")
    kohya_folder = os.path.join(model_dir, repo_id.replace("/", "_")) if repo_id else None
    for folder in (model_dir, kohya_folder):
        if folder and _has_files(folder):
            return os.path.join(folder, MODEL_FILE), os.path.join(folder, LABELS_FILE)
    missing = " and ".join(f for f in _FILES if not os.path.isfile(os.path.join(model_dir, f)))
    raise ModelLoadError(f"model_dir: '{model_dir}' has no {missing}; give the folder that holds {MODEL_FILE} and "
                         f"{LABELS_FILE} of a WD14 tagger, or leave out --model_dir to download --repo_id",
                         setting="model_dir")


def _how_to_download(repo_id: str) -> str:
    return (f"hf download {repo_id} {MODEL_FILE} {LABELS_FILE} (or give --model_dir, a folder with {MODEL_FILE} and "
            f"{LABELS_FILE})")


def _download(repo_id: str, force: bool, cache_dir: str | None) -> tuple[str, str]:
    try:
        import huggingface_hub
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError)
    except ImportError as e:
        raise ModelLoadError(f"repo_id: huggingface_hub is not installed ({e}); run install.sh, or give --model_dir",
                             setting="repo_id") from None
    paths = []
    for filename in _FILES:
        try:
            if not force:
                try:
                    paths.append(huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir,
                                                                 local_files_only=True))
                    continue
                except LocalEntryNotFoundError:
                    if _offline():
                        raise
            paths.append(huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir, force_download=force))
        except (GatedRepoError, RepositoryNotFoundError):
            raise ModelLoadError(f"repo_id: '{repo_id}' is not a Hugging Face repository you can read; check the name "
                                 "(e.g. SmilingWolf/wd-swinv2-tagger-v3), or log in with `hf auth login`",
                                 setting="repo_id") from None
        except LocalEntryNotFoundError:
            if _offline():
                raise ModelLoadError(f"repo_id: '{repo_id}' is not in the Hugging Face cache and HF_HUB_OFFLINE is set, "
                                     f"so nothing is downloaded; run once online without HF_HUB_OFFLINE, or: "
                                     f"{_how_to_download(repo_id)}", setting="repo_id") from None
            raise ModelLoadError(f"repo_id: '{repo_id}' is not in the Hugging Face cache and the Hub cannot be reached; "
                                 f"connect to the internet and run again, or on a connected machine: "
                                 f"{_how_to_download(repo_id)}", setting="repo_id") from None
        except EntryNotFoundError:
            raise ModelLoadError(f"repo_id: '{repo_id}' has no {filename}; it is not a WD14 tagger in the published "
                                 "layout (model.onnx + selected_tags.csv), e.g. SmilingWolf/wd-swinv2-tagger-v3",
                                 setting="repo_id") from None
        except OSError as e:
            raise ModelLoadError(f"repo_id: downloading {filename} of '{repo_id}' failed ({type(e).__name__}: {e}); "
                                 f"run again, or: {_how_to_download(repo_id)}", setting="repo_id") from None
    return paths[0], paths[1]


def find_model_files(repo_id: str | None, model_dir: str | None = None, force_download: bool = False,
                     cache_dir: str | None = None) -> tuple[str, str]:
    """``(model.onnx, selected_tags.csv)`` from ``model_dir`` when given, else from the Hub repo ``repo_id``."""
    if model_dir:
        return _from_model_dir(model_dir, repo_id or "")
    if not repo_id or repo_id.count("/") != 1 or any(not part.strip() for part in repo_id.split("/")):
        raise ConfigError(f"repo_id: {repo_id!r} is not a Hugging Face repository id; write it as owner/name, e.g. "
                          f"{DEFAULT_REPO}, or give --model_dir", setting="repo_id")
    return _download(repo_id, force_download, cache_dir)


def read_labels(path: str, setting: str = "model_dir") -> list[Label]:
    """The rows of ``selected_tags.csv``; ModelLoadError naming ``setting`` for another file."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ModelLoadError(f"{setting}: cannot read {path} ({type(e).__name__}); download the tagger again",
                             setting=setting) from None
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if header[:3] != ["tag_id", "name", "category"]:
        raise ModelLoadError(f"{setting}: {path} is not a WD14 {LABELS_FILE} (its first line must be "
                             "tag_id,name,category,count); download the tagger again", setting=setting)
    labels = []
    for number, row in enumerate(rows[1:], start=2):
        try:
            labels.append(Label(row[1], int(row[2])))
        except (IndexError, ValueError):
            raise ModelLoadError(f"{setting}: {path} line {number} is not 'tag_id,name,category,count'; download the "
                                 "tagger again", setting=setting) from None
    if not labels:
        raise ModelLoadError(f"{setting}: {path} lists no tags; download the tagger again", setting=setting)
    return labels


# --------------------------------------------------------------------------------------------- images


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """An RGB image as the tagger's input: ``(size, size, 3)`` float32, BGR, 0-255 (see the module docstring)."""
    width, height = image.size
    side = max(width, height)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(square, dtype=np.float32)[:, :, ::-1])


def mcut_threshold(probs: np.ndarray) -> float:
    """MCut (Largeron et al., 2012): the midpoint of the largest gap between the sorted probabilities."""
    ordered = np.sort(np.asarray(probs, dtype=np.float64))[::-1]
    if ordered.size < 2:
        return float(ordered[0]) if ordered.size else 1.0
    gaps = ordered[:-1] - ordered[1:]
    t = int(gaps.argmax())
    return float((ordered[t] + ordered[t + 1]) / 2)


# --------------------------------------------------------------------------------------------- the model


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ModelLoadError(f"onnxruntime is not installed ({e}); run install.sh (or: pip install onnxruntime)",
                             setting="repo_id") from None
    return onnxruntime


def _providers(ort, device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        if hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from the pip packages torch installed
            try:
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - the provider falls back to what the system has
                pass
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise ConfigError("device: cuda was asked for but this onnxruntime has no CUDA provider; install "
                          "onnxruntime-gpu (bash install.sh --gpu) or use --device cpu", setting="device")
    return ["CPUExecutionProvider"]


def _dim(value) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


class WD14Tagger:
    """A WD14 tagger session: ``probabilities(batch)`` for prepared images."""

    def __init__(self, model_path: str, labels: list[Label], device: str = "auto", setting: str = "model_dir"):
        self.setting = setting
        ort = _import_onnxruntime()
        options = ort.SessionOptions()
        threads = os.environ.get("OMP_NUM_THREADS", "").strip()
        if threads.isdigit() and int(threads) > 0:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(model_path, sess_options=options, providers=_providers(ort, device))
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelLoadError(f"{setting}: {model_path} is not a model onnxruntime can load "
                                 f"({type(e).__name__}); download the tagger again", setting=setting) from None
        self.providers = self.session.get_providers()
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = list(inputs[0].shape) if inputs else []
        out_shape = list(outputs[0].shape) if outputs else []
        height, width = (_dim(shape[1]), _dim(shape[2])) if len(shape) == 4 else (None, None)
        if (len(inputs) != 1 or len(shape) != 4 or shape[3] != 3 or height is None or height != width
                or "float" not in inputs[0].type or len(out_shape) != 2):
            raise ModelLoadError(f"{setting}: {model_path} is not a WD14 tagger (input {shape}, output {out_shape}; "
                                 "expected one [batch, size, size, 3] float image input and [batch, tags] output); "
                                 "use a SmilingWolf wd-*-tagger model", setting=setting)
        if _dim(out_shape[1]) is not None and out_shape[1] != len(labels):
            raise ModelLoadError(f"{setting}: {model_path} predicts {out_shape[1]} tags but {LABELS_FILE} lists "
                                 f"{len(labels)}; the two files come from different taggers, download both again",
                                 setting=setting)
        self.input_name = inputs[0].name
        self.size = int(height)
        self.fixed_batch = _dim(shape[0])  # some exported models take exactly N images
        self.labels = labels

    @property
    def on_gpu(self) -> bool:
        return self.providers[:1] == ["CUDAExecutionProvider"]

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """``(n, tags)`` probabilities for ``(n, size, size, 3)`` prepared images."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        step = self.fixed_batch
        if not step or len(batch) == step:
            return self._run(batch)
        parts = []
        for start in range(0, len(batch), step):
            part = batch[start:start + step]
            pad = np.zeros((step - len(part), *batch.shape[1:]), dtype=np.float32)
            parts.append(self._run(np.concatenate([part, pad]))[:len(part)])
        return np.concatenate(parts)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        probs = self.session.run(None, {self.input_name: batch})[0]
        if probs.shape != (len(batch), len(self.labels)):
            raise ModelLoadError(f"{self.setting}: the tagger returned {list(probs.shape)} for {len(batch)} images, "
                                 f"expected [{len(batch)}, {len(self.labels)}]; use a SmilingWolf wd-*-tagger model",
                                 setting=self.setting)
        return probs
