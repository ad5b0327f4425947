#!/usr/bin/env python
"""Tag a dataset's images with a WD14 tagger (SmilingWolf's v2/v3 ONNX models) into caption files.

    python scripts/tag_images.py my_dataset/10_mychar --trigger_words mychar --remove_underscore
    python scripts/tag_images.py my_dataset --recursive --repo_id SmilingWolf/wd-eva02-large-tagger-v3 --batch_size 8
    python scripts/tag_images.py folder_a folder_b --general_mcut --character_threshold 0.85 --dry_run
    python scripts/tag_images.py --queue examples/tag_queue.txt --model_dir path/to/tagger --append

Writes <image name>.txt (--caption_extension) beside each image. The arguments of kohya's
finetune/tag_images_by_wd14_tagger.py work the same here, with these differences:
  * an existing caption is never overwritten: images that have one are skipped unless --append
    (or kohya's --append_tags: new tags after the caption's own) or --overwrite is given;
  * the tagger comes from the Hugging Face cache (downloaded once), or --model_dir: a folder with
    model.onnx and selected_tags.csv (kohya's <model_dir>/<repo id with _ for /> is found too);
    the default --repo_id is SmilingWolf/wd-swinv2-tagger-v3 (kohya: wd-v1-4-convnext-tagger-v2);
  * tags are sorted by confidence (--tag_order; kohya: the model's order), --batch_size is 4 (kohya: 1),
    and always ONNX (--onnx is accepted and changes nothing);
  * a tag-frequency summary is always printed (all tags with --frequency_tags).
Images are never modified. Several folders may be given, or a --queue txt file (one per line);
every folder is checked before the model loads.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _tool_cli as cli  # noqa: E402

from sd_scripts.data.wd14_tagger import DEFAULT_REPO, KOHYA_DEFAULT_REPO  # noqa: E402  (numpy and PIL, no torch)

TOOL = "tag_images"
TOP_TAGS = 30


def build_parser():
    p = cli.ToolParser(prog="tag_images.py", description=__doc__.split("\n\n")[0],
                       epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("train_data_dir", nargs="*", help="folder(s) of images to tag")
    p.add_argument("--queue", default=None, help="txt file listing image folders, one per line (# comments)")
    p.add_argument("--repo_id", default=DEFAULT_REPO,
                   help=f"Hugging Face repo of the tagger (default {DEFAULT_REPO}; kohya's: {KOHYA_DEFAULT_REPO})")
    p.add_argument("--model_dir", default=None,
                   help="local folder with model.onnx and selected_tags.csv (instead of downloading --repo_id)")
    p.add_argument("--force_download", action="store_true", help="download the tagger again into the cache")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): the GPU when onnxruntime has CUDA, otherwise the CPU")
    p.add_argument("--batch_size", type=int, default=4, help="images per model call (default 4; kohya: 1)")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None,
                   help="threads that load and prepare images (default 2)")
    p.add_argument("--caption_extension", default=None, help="extension of the caption files (default .txt)")
    p.add_argument("--caption_extention", default=None, help=argparse.SUPPRESS)
    p.add_argument("--thresh", type=float, default=0.35, help="confidence a tag needs to be written (default 0.35)")
    p.add_argument("--general_threshold", type=float, default=None, help="threshold of general tags (default --thresh)")
    p.add_argument("--character_threshold", type=float, default=None,
                   help="threshold of character tags (default --thresh; 0.85 avoids wrong names)")
    p.add_argument("--general_mcut", action="store_true",
                   help="choose each image's general threshold automatically (MCut: the largest gap in confidence)")
    p.add_argument("--character_mcut", action="store_true",
                   help="the same for character tags (never below 0.15)")
    p.add_argument("--recursive", action="store_true", help="also tag the images of every subfolder")
    p.add_argument("--remove_underscore", action="store_true",
                   help="underscores to spaces (long_hair -> long hair), emoticons such as ^_^ excepted")
    p.add_argument("--undesired_tags", default="", help="comma-separated tags never written (* matches any text)")
    p.add_argument("--tag_replacement", default=None,
                   help="'old,new;old2,new2' (\\, for a comma inside a tag; an empty new tag removes the old one)")
    p.add_argument("--character_tag_expand", action="store_true",
                   help="write a character tag name_(series) as two tags: name, series")
    p.add_argument("--use_rating_tags", action="store_true", help="write the rating tag (general, sensitive, ...) first")
    p.add_argument("--use_rating_tags_as_last_tag", action="store_true", help="write the rating tag last")
    p.add_argument("--character_tags_first", action="store_true", help="character tags before the general tags")
    p.add_argument("--always_first_tags", default=None,
                   help="comma-separated tags put first when found, in this order (e.g. '1girl, 1boy')")
    p.add_argument("--trigger_words", "--trigger_word", dest="trigger_words", default=None,
                   help="comma-separated words put first in every caption (e.g. your LoRA's trigger word)")
    p.add_argument("--tag_order", choices=("confidence", "alphabetical", "model"), default="confidence",
                   help="order of the tags after the first ones (default confidence; kohya: model)")
    p.add_argument("--caption_separator", default=", ", help="between tags (default ', ')")
    p.add_argument("--append", "--append_tags", dest="append", action="store_true",
                   help="add the new tags after an existing caption's own (default: leave captioned images alone)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing captions (default: leave captioned images alone; kohya always replaced)")
    p.add_argument("--dry_run", action="store_true", help="print the captions instead of writing them")
    p.add_argument("--frequency_tags", action="store_true", help=f"list every tag's count at the end (default: top {TOP_TAGS})")
    p.add_argument("--debug", action="store_true", help="print each image's tags with their confidence")
    p.add_argument("--onnx", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pin_memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--popup", action="store_true", help="answer questions in windows instead of using flags")
    return p


def _folders(args) -> list[str]:
    from sd_scripts.core.errors import ConfigError

    folders = list(args.train_data_dir)
    if args.queue:
        folders += cli.read_folder_list(args.queue)
    if not folders:
        raise ConfigError("train_data_dir: missing; give the folder of images to tag (or --queue FILE with one folder "
                          "per line)", setting="train_data_dir")
    return folders


def _settings(args):
    from sd_scripts.data.tag_selection import TagSettings
    from sd_scripts.data.tag_text import parse_replacements, parse_tag_list
    from sd_scripts.core.errors import ConfigError

    for name in ("thresh", "general_threshold", "character_threshold"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1:
            raise ConfigError(f"{name}: must be a probability from 0 to 1 (e.g. 0.35), got {value:g}", setting=name)
    if args.use_rating_tags and args.use_rating_tags_as_last_tag:
        raise ConfigError("use_rating_tags: give --use_rating_tags (first) or --use_rating_tags_as_last_tag, not both",
                          setting="use_rating_tags")
    separator = args.caption_separator.strip() or ","
    return TagSettings(
        general_threshold=args.thresh if args.general_threshold is None else args.general_threshold,
        character_threshold=args.thresh if args.character_threshold is None else args.character_threshold,
        general_mcut=args.general_mcut,
        character_mcut=args.character_mcut,
        rating="first" if args.use_rating_tags else "last" if args.use_rating_tags_as_last_tag else "none",
        character_first=args.character_tags_first,
        order=args.tag_order,
        undesired=tuple(parse_tag_list(args.undesired_tags, separator)),
        replacements=tuple(parse_replacements(args.tag_replacement, "tag_replacement")),
        remove_underscore=args.remove_underscore,
        character_tag_expand=args.character_tag_expand,
        always_first=tuple(parse_tag_list(args.always_first_tags, separator)),
        trigger_words=tuple(parse_tag_list(args.trigger_words, separator)),
    )


def _mode(args) -> str:
    from sd_scripts.core.errors import ConfigError

    if args.append and args.overwrite:
        raise ConfigError("append: give --append (add to existing captions) or --overwrite (replace them), not both",
                          setting="append")
    return "append" if args.append else "overwrite" if args.overwrite else "skip"


def _check_numbers(args) -> int:
    from sd_scripts.core.errors import ConfigError

    if args.batch_size < 1:
        raise ConfigError(f"batch_size: must be 1 or more, got {args.batch_size}", setting="batch_size")
    workers = 2 if args.max_data_loader_n_workers is None else args.max_data_loader_n_workers
    if workers < 1:
        raise ConfigError(f"max_data_loader_n_workers: must be 1 or more, got {workers}",
                          setting="max_data_loader_n_workers")
    return workers


def _print_frequency(frequency, everything: bool) -> None:
    if not frequency:
        return
    items = frequency.most_common() if everything else frequency.most_common(TOP_TAGS)
    shown = "" if everything or len(frequency) <= TOP_TAGS else f" ({TOP_TAGS} most frequent of {len(frequency)}; " \
                                                                  "--frequency_tags lists all)"
    print(f"Tag frequencies{shown}:")
    for tag, count in items:
        print(f"  {count:5d}  {tag}")


def main(argv=None) -> int:
    args = cli.parse_args(build_parser, TOOL, argv)
    if args is None:
        return 0
    from sd_scripts.data.caption_files import check_caption_extension
    from sd_scripts.data.image_tagging import find_images, plan_captions

    # every setting and folder is checked before the model loads: a mistake writes nothing
    settings = _settings(args)
    mode = _mode(args)
    workers = _check_numbers(args)
    extension = check_caption_extension(args.caption_extension or args.caption_extention or ".txt")
    folders = _folders(args)
    setting = "queue" if args.queue and not args.train_data_dir else "train_data_dir"
    images = [image for folder in folders for image in find_images(folder, args.recursive, setting)]
    jobs, kept = plan_captions(images, extension, mode)
    if kept:
        print(f"{len(kept)} of {len(images)} images already have a caption and are left alone "
              "(--append adds to them, --overwrite replaces them)")
    if not jobs:
        print("nothing to tag")
        return 0

    from sd_scripts.data.image_tagging import tag_captions
    from sd_scripts.data.wd14_tagger import WD14Tagger, find_model_files, read_labels
    from tqdm import tqdm

    model_setting = "model_dir" if args.model_dir else "repo_id"
    model_path, labels_path = find_model_files(args.repo_id, args.model_dir, args.force_download)
    tagger = WD14Tagger(model_path, read_labels(labels_path, model_setting), args.device, model_setting)
    print(f"tagger: {args.model_dir or args.repo_id} ({tagger.size}x{tagger.size}, "
          f"{'GPU' if tagger.on_gpu else 'CPU'}); {len(jobs)} images to tag")

    def show(job, text, chosen):
        if args.dry_run:
            bar.write(f"{job.caption}: {text.strip()}")
        if args.debug:
            bar.write(f"{job.image}: " + ", ".join(t if p is None else f"{t} ({p:.2f})" for t, p in chosen))

    with tqdm(total=len(jobs), unit="image", smoothing=0.0, disable=None) as bar:
        result = tag_captions(tagger, settings, jobs, batch_size=args.batch_size, workers=workers,
                              separator=args.caption_separator, dry_run=args.dry_run, on_caption=show,
                              progress=bar.update)
    for image, reason in result.failed:
        cli.say_error(f"skipped {image}: {reason}")
    _print_frequency(result.frequency, args.frequency_tags)
    verb = "would write" if args.dry_run else "wrote"
    appended = " (added to existing captions)" if mode == "append" else ""
    print(f"{verb} {len(result.written)} captions{appended}"
          + (f"; {len(result.failed)} images could not be read" if result.failed else "")
          + (" (dry run: nothing written)" if args.dry_run else ""))
    return 1 if result.failed and not result.written else 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
