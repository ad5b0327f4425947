#!/usr/bin/env python
"""Write natural-language captions for a dataset's images with an image-to-text model.

    python scripts/caption_images.py my_dataset/10_mychar --trigger_words mychar
    python scripts/caption_images.py my_dataset --recursive --prompt "<MORE_DETAILED_CAPTION>" --batch_size 8
    python scripts/caption_images.py my_dataset --model fancyfeast/llama-joycaption-beta-one-hf-llava --prompt "Write a descriptive caption for this image in a formal tone."
    python scripts/caption_images.py --queue examples/tag_queue.txt --model path/to/model_folder --append

Any model that transformers loads natively as image-to-text: Florence-2, BLIP, LLaVA models such as JoyCaption,
Qwen2.5-VL, SmolVLM, GIT. --model is a Hugging Face repo id (downloaded once into the Hugging Face cache) or a
local folder. The default, florence-community/Florence-2-large (0.77B parameters), needs about 2 GB of VRAM in
half precision and runs, slowly, on a CPU; --prompt is its task: <CAPTION> (one sentence), <DETAILED_CAPTION>
(default) or <MORE_DETAILED_CAPTION> (a paragraph). For a chat model (LLaVA, Qwen2.5-VL, SmolVLM) --prompt is the
message sent with each image; BLIP takes no prompt (or a start such as "a photo of").

Writes <image name>.txt (--caption_extension) beside each image as "trigger words, prefix caption suffix"; an
existing caption is never overwritten: those images are skipped unless --append (the new caption after the
caption's own text) or --overwrite is given; --dry_run prints the captions instead. Images are never modified.
Several folders may be given, or a --queue txt file (one per line); every folder is checked before the model loads.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _tool_cli as cli  # noqa: E402

TOOL = "caption_images"
DEFAULT_MODEL = "florence-community/Florence-2-large"  # sd_scripts.data.caption_model.DEFAULT_MODEL (checked in a test)


def build_parser():
    p = cli.ToolParser(prog="caption_images.py", description=__doc__.split("\n\n")[0],
                       epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("train_data_dir", nargs="*", help="folder(s) of images to caption")
    p.add_argument("--queue", default=None, help="txt file listing image folders, one per line (# comments)")
    p.add_argument("--recursive", action="store_true", help="also caption the images of every subfolder")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"Hugging Face repo id or local folder of an image-to-text model (default {DEFAULT_MODEL})")
    p.add_argument("--prompt", default=None,
                   help="Florence-2: the task (<CAPTION>, <DETAILED_CAPTION> (default), <MORE_DETAILED_CAPTION>); "
                        "chat models: the message sent with each image; BLIP: none, or the caption's start")
    p.add_argument("--max_length", type=int, default=150, help="most tokens written per caption (default 150)")
    p.add_argument("--num_beams", type=int, default=3, help="beam search width; 1 is greedy and fastest (default 3)")
    p.add_argument("--batch_size", type=int, default=2, help="images per model call (default 2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): the GPU when CUDA is available, else the CPU")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="auto (default): bfloat16 or float16 on a GPU, float32 on a CPU")
    p.add_argument("--caption_extension", default=".txt", help="extension of the caption files (default .txt)")
    p.add_argument("--trigger_words", "--trigger_word", dest="trigger_words", default=None,
                   help="comma-separated words written first in every caption, e.g. the LoRA's trigger word")
    p.add_argument("--prefix", default="", help="text written before the model's caption")
    p.add_argument("--suffix", default="", help="text written after the model's caption")
    p.add_argument("--caption_separator", default=", ", help="after the trigger words, and before an appended caption")
    p.add_argument("--append", action="store_true",
                   help="add the new caption after an existing caption's text (default: skip captioned images)")
    p.add_argument("--overwrite", action="store_true", help="replace existing captions (default: skip captioned images)")
    p.add_argument("--dry_run", action="store_true", help="print the captions instead of writing them")
    p.add_argument("--popup", action="store_true", help="answer questions in windows instead of using flags")
    return p


def _folders(args) -> list[str]:
    from sd_scripts.core.errors import ConfigError

    folders = list(args.train_data_dir)
    if args.queue:
        folders += cli.read_folder_list(args.queue)
    if not folders:
        raise ConfigError("train_data_dir: missing; give the folder of images to caption (or --queue FILE with one "
                          "folder per line)", setting="train_data_dir")
    return folders


def _check(args) -> str:
    """The write mode; one line naming the setting for a bad value (before anything loads)."""
    from sd_scripts.core.errors import ConfigError

    for name, low in (("max_length", 1), ("num_beams", 1), ("batch_size", 1)):
        if getattr(args, name) < low:
            raise ConfigError(f"{name}: must be {low} or more, got {getattr(args, name)}", setting=name)
    if args.append and args.overwrite:
        raise ConfigError("append: give --append (add to existing captions) or --overwrite (replace them), not both",
                          setting="append")
    return "append" if args.append else "overwrite" if args.overwrite else "skip"


def main(argv=None) -> int:
    args = cli.parse_args(build_parser, TOOL, argv)
    if args is None:
        return 0
    from sd_scripts.data.caption_files import check_caption_extension
    from sd_scripts.data.image_tagging import find_images, plan_captions
    from sd_scripts.data.tag_text import parse_tag_list

    # every setting and folder is checked before the model loads: a mistake writes nothing
    mode = _check(args)
    extension = check_caption_extension(args.caption_extension)
    folders = _folders(args)
    setting = "queue" if args.queue and not args.train_data_dir else "train_data_dir"
    images = [image for folder in folders for image in find_images(folder, args.recursive, setting)]
    jobs, kept = plan_captions(images, extension, mode)
    if kept:
        print(f"{len(kept)} of {len(images)} images already have a caption and are left alone "
              "(--append adds to them, --overwrite replaces them)")
    if not jobs:
        print("nothing to caption")
        return 0

    from tqdm import tqdm

    from sd_scripts.data.caption_model import load_caption_model
    from sd_scripts.data.image_captioning import CaptionText, caption_images

    separator = args.caption_separator if args.caption_separator.strip() else ", "
    text = CaptionText(trigger_words=tuple(parse_tag_list(args.trigger_words, ",")), prefix=args.prefix,
                       suffix=args.suffix, separator=separator)
    model = load_caption_model(args.model, prompt=args.prompt, device=args.device, dtype=args.dtype,
                               max_new_tokens=args.max_length, num_beams=args.num_beams)
    prompt = f", prompt {model.prompt!r}" if model.prompt else ""
    print(f"captioner: {args.model} ({model.style}{prompt}; {model.device}); {len(jobs)} images to caption")

    def show(job, written):
        if args.dry_run:
            bar.write(f"{job.caption}: {written.strip()}")

    with tqdm(total=len(jobs), unit="image", smoothing=0.0, disable=None) as bar:
        result = caption_images(model, jobs, text, batch_size=args.batch_size, dry_run=args.dry_run,
                                on_caption=show, progress=bar.update)
    for image, reason in result.failed:
        cli.say_error(f"skipped {image}: {reason}")
    verb = "would write" if args.dry_run else "wrote"
    appended = " (added to existing captions)" if mode == "append" else ""
    print(f"{verb} {len(result.written)} captions{appended}"
          + (f"; {len(result.failed)} images could not be read" if result.failed else "")
          + (" (dry run: nothing written)" if args.dry_run else ""))
    return 1 if result.failed and not result.written else 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
