#!/usr/bin/env python
"""Look at a dataset before training: a text summary and a picture (bucket chart and thumbnails).

    python scripts/dataset_report.py my_dataset
    python scripts/dataset_report.py --json my_training.json
    python scripts/dataset_report.py my_dataset --resolution 1024 --batch_size 2 --save_to report.png

The dataset folder holds <repeats>_<name> folders as for training, or the images themselves (one subset,
--repeats times per epoch). Settings not given come from --json (a training JSON: ours, the 2023 tool's or a
kohya_ss GUI file), else from ArgsList.py: the same the training would use. The report lists images and steps
per epoch per subset; images without captions, captions without images, unreadable images; images smaller than
the training resolution; near-duplicate pairs (perceptual hash); caption length in CLIP tokens against
75/150/225; tag frequency; and the bucket of each image, placed by the training's own code. It is printed,
written as <dataset>_report.txt and drawn as <dataset>_report.png beside the dataset folder (or --save_to).
Nothing in the dataset is changed. --queue: a txt file with one dataset folder per line (relative to the file's folder), a report each.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sd_scripts.core.config import TrainConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _tool_cli as cli  # noqa: E402

TOOL = "dataset_report"
# this tool's flag (kohya's name) -> the ArgsList.py setting it sets
_SETTINGS = {
    "enable_bucket": "buckets",
    "min_bucket_reso": "min_bucket_resolution",
    "max_bucket_reso": "max_bucket_resolution",
    "bucket_reso_steps": "bucket_reso_steps",
    "bucket_no_upscale": "bucket_no_upscale",
    "batch_size": "batch_size",
    "caption_extension": "caption_extension",
    "max_token_length": "max_clip_token_length",
    "tokenizer_cache_dir": "tokenizer_cache_dir",
    "reg_data_dir": "reg_img_folder",
    "dataset_config": "dataset_config",
}


def build_parser():
    p = cli.ToolParser(prog="dataset_report.py", description=__doc__.split("\n\n")[0],
                       epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("train_data_dir", nargs="?", default=None,
                   help="dataset folder: the one holding the <repeats>_<name> folders, or the images themselves")
    p.add_argument("--json", default=None, help="training settings JSON whose dataset and settings are reported")
    p.add_argument("--reg_data_dir", default=None, help="regularization folder (<repeats>_<name> folders)")
    p.add_argument("--dataset_config", default=None, help="dataset TOML in kohya's format, instead of a folder")
    p.add_argument("--resolution", default=None, help="training resolution: W or W,H (default 512, or the JSON's)")
    buckets = p.add_mutually_exclusive_group()
    buckets.add_argument("--enable_bucket", action="store_const", const=True, default=None,
                         help="aspect-ratio buckets (ArgsList.py's default: on)")
    buckets.add_argument("--no_bucket", dest="enable_bucket", action="store_const", const=False,
                         help="no buckets: every image is cropped to the resolution")
    p.add_argument("--min_bucket_reso", type=int, default=None, help="smallest bucket side in pixels")
    p.add_argument("--max_bucket_reso", type=int, default=None, help="largest bucket side in pixels")
    p.add_argument("--bucket_reso_steps", type=int, default=None, help="bucket sides are multiples of this (64)")
    p.add_argument("--bucket_no_upscale", action="store_const", const=True, default=None,
                   help="never upscale small images into a bigger bucket")
    p.add_argument("--repeats", type=int, default=None,
                   help="repeats per epoch of a folder of images without <repeats>_<name> folders (default 1)")
    p.add_argument("--batch_size", type=int, default=None, help="training batch size (steps per epoch)")
    p.add_argument("--caption_extension", default=None, help="caption file extension (default .txt)")
    p.add_argument("--max_token_length", type=int, choices=(75, 150, 225), default=None,
                   help="caption tokens the training reads: 75, 150 or 225")
    p.add_argument("--tokenizer_cache_dir", default=None,
                   help="folder holding a CLIP tokenizer, for exact token counts (else estimated)")
    p.add_argument("--duplicate_distance", type=int, default=4,
                   help="near-duplicates: hashes differing in at most this many of 64 bits (default 4; 0 = identical)")
    p.add_argument("--max_thumbnails", type=int, default=400, help="thumbnails drawn at most (default 400)")
    p.add_argument("--save_to", default=None,
                   help="the picture (.png; the text goes beside it as .txt); default <dataset>_report.png beside the "
                        "dataset folder; with --queue, a folder")
    p.add_argument("--queue", default=None, help="txt file: one dataset folder per line, a report each")
    p.add_argument("--overwrite", action="store_true", help="replace report files that already exist")
    p.add_argument("--popup", action="store_true", help="answer questions in windows instead of using flags")
    return p


# --------------------------------------------------------------------------------------------- settings


def _command_line_values(args, folder: str | None) -> dict:
    """ArgsList.py settings given by the flags (and the dataset folder)."""
    from sd_scripts.data.dataset_layout import parse_resolution

    values = {}
    if args.json:
        values["load_json_path"] = args.json
    if folder:
        values["img_folder"] = folder
    for flag, name in _SETTINGS.items():
        if getattr(args, flag) is not None:
            values[name] = getattr(args, flag)
    if args.resolution is not None:
        width, height = parse_resolution(args.resolution)
        values["train_resolution"], values["height_resolution"] = width, height
    if args.repeats is not None:
        values["dataset_repeats"] = args.repeats
    return values


def _loose_images(folder: str) -> bool:
    """True when ``folder`` has images directly inside and no <repeats>_<name> folders."""
    from sd_scripts.data.dataset_layout import parse_folder_name
    from sd_scripts.data.images import is_image_file

    entries = list(os.scandir(folder))
    if any(e.is_dir() and (parse_folder_name(e.name) or (0,))[0] >= 1 for e in entries):
        return False
    return any(e.is_file() and is_image_file(e.name) for e in entries)


def _check_values(args) -> None:
    from sd_scripts.core.errors import ConfigError

    if args.repeats is not None and args.repeats < 1:
        raise ConfigError(f"repeats: {args.repeats} must be 1 or more", setting="repeats")
    if args.duplicate_distance < 0 or args.duplicate_distance > 64:
        raise ConfigError(f"duplicate_distance: {args.duplicate_distance} must be from 0 to 64 (bits of the hash)",
                          setting="duplicate_distance")
    if args.max_thumbnails < 0:
        raise ConfigError(f"max_thumbnails: {args.max_thumbnails} must be 0 or more", setting="max_thumbnails")


def training_config(args, folder: str | None, temp_dir: str):
    """``(TrainConfig, notes)`` for the report: defaults < --json < flags, as the training resolves them. A folder of
    loose images becomes a one-subset dataset_config (written in ``temp_dir``)."""
    from frontend.resolve import resolve_settings
    from frontend.settings_map import to_train_config
    from sd_scripts.core.errors import ConfigError

    resolved = resolve_settings(_command_line_values(args, folder))
    store = resolved.store
    notes = list(resolved.notes) + list(resolved.warnings)
    if not store.dataset_config:
        if not store.img_folder:
            raise ConfigError("train_data_dir: no dataset given; give the dataset folder (or --json with img_folder, "
                              "or --dataset_config)", setting="train_data_dir")
        if not os.path.isdir(store.img_folder):
            raise ConfigError(f"train_data_dir: folder '{store.img_folder}' does not exist; give the dataset folder",
                              setting="train_data_dir")
    config = to_train_config(store, has_cuda=False, has_xformers=False).config
    if not store.dataset_config and _loose_images(store.img_folder):
        import dataclasses
        import json

        toml = os.path.join(temp_dir, "one_folder.toml")
        with open(toml, "w", encoding="utf-8") as f:
            f.write("[[datasets]]\n[[datasets.subsets]]\n"
                    f"image_dir = {json.dumps(os.path.abspath(store.img_folder))}\n"
                    f"num_repeats = {int(store.dataset_repeats or 1)}\n")
        config = dataclasses.replace(config, dataset_config=toml, train_data_dir=None, reg_data_dir=None)
        if store.reg_img_folder:
            notes.append("reg_data_dir is left out: the dataset folder has its images directly inside")
    elif args.repeats is not None and not store.dataset_config:
        notes.append("repeats is not used: the <repeats>_<name> folder names give the repeats")
    return config, notes


def _report_paths(args, folder: str | None, config: TrainConfig, many: bool) -> tuple[str, str]:
    """The picture and text files of one report (checked: never over an existing file without --overwrite)."""
    from sd_scripts.core.errors import ConfigError

    source = folder or config.train_data_dir or config.dataset_config or "dataset"
    name = os.path.basename(os.path.normpath(os.path.abspath(source)))
    name = os.path.splitext(name)[0] if os.path.isfile(source) else name
    default = os.path.join(os.path.dirname(os.path.normpath(os.path.abspath(source))), f"{name}_report.png")
    save_to = args.save_to
    if save_to and (many or save_to.endswith(("/", "\\")) or os.path.isdir(save_to)):
        png = os.path.join(save_to, f"{name}_report.png")
    elif save_to:
        png = save_to if save_to.lower().endswith(".png") else save_to + ".png"
    else:
        png = default
    text = os.path.splitext(png)[0] + ".txt"
    for path in (png, text):
        if os.path.isdir(path):
            raise ConfigError(f"save_to: {path} is a folder; give a .png file name", setting="save_to")
        if os.path.exists(path) and not args.overwrite:
            raise ConfigError(f"save_to: {path} already exists; add --overwrite or choose another --save_to",
                              setting="save_to")
    return png, text


# --------------------------------------------------------------------------------------------- running


class _Bars:
    """tqdm bars for the report's stages ("scan", "hash")."""

    _LABELS = {"scan": "checking images", "hash": "hashing images"}

    def __init__(self):
        self.stage = None
        self.bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=self._LABELS.get(stage, stage), unit="img", leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def report_one(args, folder: str | None, many: bool = False) -> tuple[str, str]:
    """Build, write and print one report; returns the picture and text paths."""
    from sd_scripts.data.caption_tokens import find_clip_tokenizer
    from sd_scripts.data.dataset_report import build_report
    from sd_scripts.data.report_picture import save_report_picture
    from sd_scripts.files.atomic import atomic_save_text

    with tempfile.TemporaryDirectory(prefix="lets_report_") as temp_dir:
        config, notes = training_config(args, folder, temp_dir)
        png, text_path = _report_paths(args, folder, config, many)
        bars = _Bars()
        try:
            report = build_report(config, tokenizer=find_clip_tokenizer(config),
                                  duplicate_distance=args.duplicate_distance, progress=bars)
        finally:
            bars.close()
        if folder:
            report.root = os.path.normpath(folder)  # as the user wrote it
    lines = report.lines() + [f"note: {n}" for n in notes]
    save_report_picture(report, png, args.max_thumbnails)
    atomic_save_text(text_path, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {png} and {text_path}")
    return png, text_path


def main(argv=None) -> int:
    args = cli.parse_args(build_parser, TOOL, argv)
    if args is None:
        return 0
    from sd_scripts.core.errors import ConfigError, UserError

    _check_values(args)
    if not args.queue:
        report_one(args, args.train_data_dir)
        return 0
    if args.train_data_dir or args.json or args.dataset_config:
        raise ConfigError("queue: give the dataset folders either in --queue or on the command line, not both",
                          setting="queue")
    failed = 0
    for folder in cli.read_folder_list(args.queue):
        print(f"--- {folder}")
        try:
            report_one(args, folder, many=True)
        except UserError as err:
            cli.say_error(f"skipped {folder}: {err}")
            failed += 1
    if failed:
        cli.say_error(f"{failed} of the queue's reports failed")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
