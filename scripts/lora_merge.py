#!/usr/bin/env python
"""Merge LoRAs together, or merge LoRA / LyCORIS networks into a checkpoint.

    python scripts/lora_merge.py --models a.safetensors b.safetensors --ratios 0.7 0.3 --save_to ab.safetensors --new_rank 32
    python scripts/lora_merge.py --models a.safetensors b.safetensors --ratios 1 -1 --save_to ab.safetensors --concat
    python scripts/lora_merge.py --sd_model model.safetensors --models a.safetensors b.safetensors --ratios 1 0.5 \\
        --save_to merged_model.safetensors

Together: by SVD of the summed deltas to --new_rank (--new_conv_rank for 3x3 convs; any mix of
ranks and LoRA/LoCon/LoHa/LoKr), or exactly with --concat (rank = sum of ranks, strengths kept).
Into a checkpoint (--sd_model, single-file SD1/SD2/SDXL or a FLUX.1 BFL file): LoRA, LoCon (Tucker too), LoHa, LoKr (each
with or without DoRA), IA3, GLoRA, OFT, BOFT and full networks, each with its ratio; every other key
and every dtype is kept. Ratios are any real numbers (default 1 each).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _tool_cli as cli  # noqa: E402

TOOL = "lora_merge"


def build_parser():
    p = cli.ToolParser(prog="lora_merge.py", description=__doc__.split("\n\n")[0],
                       epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("--models", nargs="+", help="LoRA / LyCORIS files")
    p.add_argument("--ratios", type=float, nargs="+", default=None, help="one ratio per model (default 1 each)")
    p.add_argument("--save_to", help="output file (.safetensors; .ckpt/.pt also work)")
    p.add_argument("--new_rank", type=int, default=None, help="rank of the merged LoRA (SVD merge)")
    p.add_argument("--new_conv_rank", type=int, default=None, help="rank of its 3x3 conv modules (default: --new_rank)")
    p.add_argument("--concat", action="store_true", help="exact merge: stack the ranks (rank = sum of ranks)")
    p.add_argument("--sd_model", default=None, help="merge into this single-file SD1/SD2/SDXL checkpoint or FLUX.1 transformer (BFL layout) instead")
    p.add_argument("--v2", action="store_true", help="the checkpoint is SD2 (checked; detected anyway)")
    p.add_argument("--verbose", action="store_true", help="print each merged module's rank and retained norm")
    cli.add_common(p)
    return p


def main(argv=None) -> int:
    args = cli.parse_args(build_parser, TOOL, argv)
    if args is None:
        return 0
    from sd_scripts.core.errors import ConfigError

    if not args.models:
        raise ConfigError("models: missing; add --models A.safetensors [B.safetensors ...]", setting="models")
    if not args.save_to:
        raise ConfigError("save_to: missing; add --save_to OUT.safetensors", setting="save_to")
    ratios = args.ratios if args.ratios is not None else [1.0] * len(args.models)
    if len(ratios) != len(args.models):
        raise ConfigError(f"ratios: {len(ratios)} ratios for {len(args.models)} models; give one ratio per model",
                          setting="ratios")
    for path in args.models:
        cli.require_file(path, "models", "LoRA file")
    if args.sd_model:
        cli.require_file(args.sd_model, "sd_model", "checkpoint")
    from sd_scripts.networks.tool_io import check_output_path

    check_output_path(args.save_to, "save_to", args.overwrite,
                      exts=(".safetensors", ".ckpt") if args.sd_model else (".safetensors", ".ckpt", ".pt", ".pth"))
    device = cli.check_device(args.device)
    if args.sd_model:
        if args.concat or args.new_rank is not None or args.new_conv_rank is not None:
            raise ConfigError("sd_model: --concat/--new_rank make a LoRA; merging into a checkpoint takes neither",
                              setting="sd_model")
        from sd_scripts.networks.lycoris_merge import merge_networks_into_checkpoint_file

        report = merge_networks_into_checkpoint_file(args.sd_model, args.models, ratios, args.save_to, v2=args.v2 or None,
                                                     save_precision=args.save_precision, device=device,
                                                     overwrite=args.overwrite)
        for label, count in report.merged.items():
            missing = report.unmatched.get(label) or []
            note = f"; {len(missing)} modules match no layer (first: {missing[0]})" if missing else ""
            print(f"merged {label}: {count} modules{note}")
        print(f"saved {args.save_to}: {report.weights_changed} weights changed")
        return 0
    from sd_scripts.networks.merge import merge_lora_files

    reports = merge_lora_files(args.models, ratios, args.save_to, args.new_rank, args.new_conv_rank, args.concat,
                               args.save_precision, device, args.overwrite)
    if args.verbose:
        for r in reports:
            print(f"{r.name:75} | from {r.sources} file(s), rank {r.rank}, fro retained {r.fro:.1%}")
    ranks = sorted({r.rank for r in reports})
    fro = sum(r.fro for r in reports) / max(1, len(reports))
    shown = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    print(f"saved {args.save_to}: {len(reports)} modules, rank {shown}, mean Frobenius norm retained {fro:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
