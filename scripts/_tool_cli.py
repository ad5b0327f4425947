"""Shared command-line plumbing of the side tools in ``scripts/`` (no torch import here).

* :class:`ToolParser`: argparse with exact option names (no prefix abbreviations) whose errors are
  one line and exit code 2.
* :func:`run`: runs a tool's ``main``; a :class:`UserError` prints its one line and exits 2 (no
  traceback, nothing written); bugs keep their traceback.
* ``--popup``: :func:`popup_arguments` asks ``popups.<tool>.ask_arguments()`` for the tool's
  command-line arguments (None = cancelled); when that wizard does not exist yet it says so.
* Queues: :func:`read_queue` reads a txt queue (one entry per line, ``#`` comments);
  :func:`queue_output_path` names each entry's output; :func:`read_folder_list` reads a txt list
  of folders (one per line) for the dataset tools.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from sd_scripts.core.errors import EXIT_USER_ERROR, ConfigError, UserError  # noqa: E402  (no torch)

__all__ = ["ToolParser", "check_device", "require_file", "popup_arguments", "queue_output_path", "read_queue",
           "read_folder_list", "run", "say_error"]

PRECISIONS = ("float", "fp16", "bf16")


class ToolParser(argparse.ArgumentParser):
    """argparse with exact option names and one-line errors (exit code 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # noqa: D401 - argparse API
        say_error(f"{self.prog}: {message} (see --help)")
        sys.exit(EXIT_USER_ERROR)


def add_common(parser: argparse.ArgumentParser, precision_flag: str | None = "--save_precision") -> None:
    """Flags every tool has: device, precision, overwrite, popup."""
    parser.add_argument("--device", default=None, help="cpu (default) or cuda: where the SVD / merge math runs")
    if precision_flag:
        parser.add_argument(precision_flag, default=None, choices=PRECISIONS,
                            help="precision of the file written (default: keep the input's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an output file that already exists")
    parser.add_argument("--popup", action="store_true", help="answer questions in windows instead of using flags")


def say_error(line: str) -> None:
    print(" ".join(str(line).split()), file=sys.stderr, flush=True)


def require_file(path, setting: str, what: str = "file") -> None:
    """ConfigError naming ``setting`` when ``path`` is not an existing file (checked before torch loads)."""
    if not path or not Path(path).is_file():
        raise ConfigError(f"{setting}: {path} does not exist or is not a file; give the path of the {what}", setting=setting)


def check_device(device: str | None) -> str | None:
    """None/'cpu' pass; 'cuda[:n]' needs a visible CUDA device (ConfigError otherwise)."""
    if device is None or str(device).strip().lower() in ("", "cpu"):
        return None
    name = str(device).strip().lower()
    if not name.startswith("cuda"):
        raise ConfigError(f"device: {device!r} is not a device; use cpu or cuda", setting="device")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA GPU is visible; use --device cpu", setting="device")
    return name


def popup_arguments(tool: str) -> list[str] | None:
    """The arguments the tool's popup wizard collected (None when the user cancelled).

    The wizard is ``popups.<tool>.ask_arguments() -> list[str] | None``; ConfigError when it is not
    available in this version."""
    try:
        module = importlib.import_module(f"popups.{tool}")
    except ImportError:
        module = None
    ask = getattr(module, "ask_arguments", None)
    if ask is None:
        raise ConfigError(f"popup: the {tool} wizard isn't available yet; use the command-line flags (see --help)",
                          setting="popup")
    return ask()


def parse_args(build_parser, tool: str, argv=None):
    """The tool's flags; with ``--popup`` they are asked in windows first. ``None`` means cancelled."""
    args = build_parser().parse_args(argv)
    while args.popup:
        asked = popup_arguments(tool)
        if asked is None:
            print("cancelled")
            return None
        args = build_parser().parse_args(asked)
    return args


def require_args(args, names: tuple[str, ...]) -> None:
    """One line naming the first missing path flag."""
    from sd_scripts.core.errors import ConfigError

    for name in names:
        if not getattr(args, name):
            raise ConfigError(f"{name}: missing; add --{name} PATH", setting=name)


def run(main, argv=None) -> int:
    """Call ``main(argv)``; user errors become one line on stderr and exit code 2."""
    try:
        return int(main(argv) or 0)
    except UserError as err:
        say_error(f"error: {err}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        say_error("interrupted")
        return 130


def _numbers(text: str) -> list[str]:
    return [p for p in text.replace(",", " ").split() if p]


def read_queue(path, columns: tuple[int, ...], setting: str = "queue") -> list[tuple[int, list[str] | None, str]]:
    """Entries of a txt queue: ``(line number, fields, raw line)``; fields is None for a malformed line
    (wrong number of values), which the caller reports as a failed entry. ``columns`` lists the
    accepted numbers of values per line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{setting}: {p} does not exist or is not a file; give a txt file, one entry per line",
                          setting=setting)
    entries = []
    for number, raw in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = _numbers(line)
        entries.append((number, fields if len(fields) in columns else None, raw.strip()))
    if not entries:
        raise ConfigError(f"{setting}: {p} has no entries", setting=setting)
    return entries


def read_folder_list(path, setting: str = "queue") -> list[str]:
    """The folders of a txt list: one per line, blank lines and lines starting with ``#`` skipped
    (a ``#`` later in a line is part of the folder's name); a relative folder is relative to the
    list file's own folder."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{setting}: {p} does not exist or is not a file; give a txt file with one folder per line",
                          setting=setting)
    folders = []
    for raw in p.read_text(encoding="utf-8-sig").splitlines():
        line = raw.strip().strip('"')
        if not line or line.startswith("#"):
            continue
        folder = Path(os.path.expanduser(line))
        folders.append(str(folder if folder.is_absolute() else p.resolve().parent / folder))
    if not folders:
        raise ConfigError(f"{setting}: {p} lists no folders; write one folder per line", setting=setting)
    return folders


def queue_output_path(save_to, model, parts: list[str]) -> Path:
    """``<base>-<part>-<part>.<ext>``: ``base`` is ``save_to`` without its extension, or
    ``<save_to folder>/<model stem>`` when ``save_to`` is a folder (existing, or ending in a slash)."""
    text = str(save_to)
    target = Path(text)
    if text.endswith(("/", "\\")) or target.is_dir():
        base, ext = target / Path(model).stem, ".safetensors"
    else:
        ext = target.suffix if target.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth") else ".safetensors"
        base = target.with_suffix("") if target.suffix.lower() == ext.lower() else target
    suffix = "-".join(_fmt(p) for p in parts)
    return base.with_name(f"{base.name}-{suffix}{ext}")


def _fmt(value) -> str:
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() and "." not in text else text
