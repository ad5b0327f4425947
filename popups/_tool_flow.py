"""What the side tools' popups share: the asking helpers, the help texts, and the run wrapper.

A tool's flow returns the tool's own command-line arguments, so the popup and the flags run the
very same code. Each question whose key is one of the tool's flags shows that flag's ``--help``
text, read from the tool's parser (``scripts/<tool>.py``), so the two never drift apart.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
from functools import lru_cache
from typing import Any, Callable

from .asker import Asker, Cancelled, Question, ask

__all__ = ["ToolFlow", "run_tool_flow", "script_help", "parse_numbers", "LORA_EXTS", "CHECKPOINT_EXTS", "PRECISIONS"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_EXTS = (".safetensors", ".ckpt", ".pt")
CHECKPOINT_EXTS = (".safetensors", ".ckpt")
PRECISIONS = ("keep", "float", "fp16", "bf16")
_PRECISION_LABELS = {"keep": "keep the input's precision", "float": "float (fp32, biggest)", "fp16": "fp16",
                     "bf16": "bf16"}
TITLES = {
    "lora_resize": "Resize a LoRA",
    "lora_merge": "Merge LoRAs",
    "locon_extract": "Extract a LoRA / LoCon",
    "locon_loha_merge": "Merge a LyCORIS network into a checkpoint",
    "image_resize": "Downscale a dataset",
    "tag_images": "Tag images (WD14 tagger)",
    "edit_tags": "Edit tags in bulk",
    "dataset_report": "Dataset report",
    "caption_images": "Caption images",
}


@lru_cache(maxsize=None)
def script_help(tool: str) -> dict[str, str]:
    """``{flag dest: help}`` from ``scripts/<tool>.py``'s parser (no torch is imported)."""
    path = os.path.join(ROOT, "scripts", f"{tool}.py")
    spec = importlib.util.spec_from_file_location(f"_lets_popup_script_{tool}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.build_parser()
    return {action.dest: action.help for action in parser._actions if action.help and action.help != "==SUPPRESS=="}


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def parse_numbers(text: str, integer: bool = False) -> list:
    """``"32 16, 8"`` -> ``[32, 16, 8]``; ValueError naming the first value that is not a number."""
    out = []
    for part in text.replace(",", " ").split():
        try:
            number = float(part)
        except ValueError:
            raise ValueError(f"{part!r} is not a number") from None
        if integer:
            if not number.is_integer():
                raise ValueError(f"{part!r} is not a whole number")
            number = int(number)
        out.append(number)
    if not out:
        raise ValueError("enter at least one value")
    return out


def number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class ToolFlow:
    """Asking helpers for one tool: titles, help from the tool's flags, device and output questions."""

    def __init__(self, asker: Asker, tool: str):
        self.asker = asker
        self.tool = tool
        self.title = TITLES.get(tool, tool)
        try:
            self.help = script_help(tool)
        except (OSError, AttributeError, ImportError):
            self.help = {}

    def ask(self, key: str, kind: str, prompt: str, default: Any = None, *, help: str | None = None,
            **extra: Any) -> Any:
        text = help if help is not None else self.help.get(key, "")
        return ask(self.asker, Question(key=key, kind=kind, prompt=prompt, title=self.title, default=default,
                                        help=text, **extra))

    def ask_numbers(self, key: str, prompt: str, default: str, *, integer: bool = False, low: float | None = None,
                    high: float | None = None, low_open: bool = False, count: Callable[[int], str | None] | None = None,
                    optional: bool = False, help: str | None = None, none_label: str = "not set") -> list | None:
        """A space-separated list of numbers, each checked against the range (re-asked with the reason)."""
        probe = Question(key=key, kind="number", prompt=prompt, integer=integer, low=low, high=high, low_open=low_open)

        def check(text: str) -> str | None:
            try:
                values = parse_numbers(text, integer)
            except ValueError as err:
                return str(err)
            for value in values:
                _, reason = probe.check_answer(value)
                if reason:
                    return f"{number_text(value)}: {reason}"
            return count(len(values)) if count else None

        text = self.ask(key, "text", prompt, default, help=help, check=check, optional=optional, none_label=none_label)
        return None if text is None else parse_numbers(text, integer)

    def ask_device(self) -> list[str]:
        """cpu or cuda, honoured as answered (the 2023 popup ran on the GPU for either button)."""
        def check(device: str) -> str | None:
            if device == "cuda" and not _cuda_available():
                return "no CUDA GPU is visible to PyTorch here; choose the CPU"
            return None

        device = self.ask("device", "choice", "Where should the math run?", "cpu", options=("cpu", "cuda"),
                          labels={"cpu": "CPU (works everywhere)", "cuda": "GPU (CUDA; faster for big files)"},
                          check=check)
        return ["--device", device]

    def ask_precision(self, key: str = "save_precision", default: str = "keep") -> list[str]:
        precision = self.ask(key, "choice", "Precision of the file written", default, options=PRECISIONS,
                             labels=_PRECISION_LABELS)
        return [] if precision == "keep" else [f"--{key}", precision]

    def ask_save_file(self, prompt: str, default: str | None, exts: tuple[str, ...]) -> list[str]:
        """The output file; an existing one is replaced only after a yes."""
        while True:
            path = self.ask("save_to", "path", prompt, default, path_kind="save_file", filetypes=exts)
            if not os.path.exists(path):
                return ["--save_to", path]
            if self.ask("overwrite", "yes_no", f"{os.path.basename(path)} already exists. Replace it?", False):
                return ["--save_to", path, "--overwrite"]
            default = path

    def ask_save_folder(self, prompt: str, default: str | None) -> list[str]:
        """An output folder for several files (written as ``folder/`` so the tool treats it as one)."""
        folder = self.ask("save_folder", "path", prompt, default, path_kind="out_dir",
                          help="each file is named after the input and the values used")
        args = ["--save_to", folder.rstrip("/\\") + os.sep]
        if os.path.isdir(folder) and os.listdir(folder):
            if self.ask("overwrite", "yes_no", "Replace files of the same name already in that folder?", False):
                args.append("--overwrite")
        return args


def command_line(tool: str, argv: list[str]) -> str:
    return f"python scripts/{tool}.py " + " ".join(shlex.quote(a) for a in argv)


def run_tool_flow(tool: str, flow: Callable[[Asker], list[str]], asker: Asker | None = None) -> list[str] | None:
    """Run a tool's flow, confirm the command, and return its arguments (None when cancelled)."""
    own = asker is None
    if own:
        from . import open_asker

        asker = open_asker(f"python scripts/{tool}.py --help")
    try:
        argv = flow(asker)
        ask(asker, Question(key="confirm", kind="summary", prompt="Run this?", title=TITLES.get(tool, tool),
                            default="start", options=("start",), labels={"start": "Run"},
                            details=("The same as the command line:", command_line(tool, argv)),
                            help="closing this window cancels"))
        return argv
    except Cancelled:
        return None
    finally:
        if own:
            asker.close()
