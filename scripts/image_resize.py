#!/usr/bin/env python
"""Downscale an image dataset to several sizes, for bucket_no_upscale training.

    python scripts/image_resize.py --src dataset --dst dataset_small --sizes 512 384 256

Each image with more than SIZE x SIZE pixels is scaled down by area, keeping its aspect ratio
(never enlarged); both sides are floored to a multiple of --divisible_by and the rest is centre-
cropped. PNGs go to <dst>/<size>/, mirroring the <n>_<name> folders; captions and other
same-named files are copied. EXIF orientation is honoured, every core is used, and the source
folder is never modified.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _tool_cli as cli  # noqa: E402

TOOL = "image_resize"


def build_parser():
    p = cli.ToolParser(prog="image_resize.py", description=__doc__.split("\n\n")[0],
                       epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("--src", help="dataset folder (read only)")
    p.add_argument("--dst", help="output folder (one subfolder per size)")
    p.add_argument("--sizes", type=int, nargs="+", help="target sizes: SIZE x SIZE pixels of area each")
    p.add_argument("--interpolation", choices=("area", "cubic", "lanczos4"), default="area",
                   help="downscaling filter (default area)")
    p.add_argument("--divisible_by", type=int, default=64, help="floor both sides to a multiple of this (default 64)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    p.add_argument("--overwrite", action="store_true", help="write into size folders that already have files")
    p.add_argument("--popup", action="store_true", help="answer questions in windows instead of using flags")
    return p


def main(argv=None) -> int:
    args = cli.parse_args(build_parser, TOOL, argv)
    if args is None:
        return 0
    from sd_scripts.core.errors import ConfigError
    from sd_scripts.data.image_resize import resize_dataset

    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"workers: {args.workers} must be 1 or more", setting="workers")
    report = resize_dataset(args.src, args.dst, args.sizes or [], args.interpolation, args.divisible_by, args.workers,
                            args.overwrite)
    for source, reason in report.skipped:
        cli.say_error(f"skipped {source}: {reason}")
    print(f"wrote {len(report.written)} images and copied {len(report.copied)} files into {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
