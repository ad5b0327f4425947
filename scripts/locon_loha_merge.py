#!/usr/bin/env python
"""Merge a LyCORIS (LoCon/LoHa/LoKr, DoRA too, IA3, GLoRA, OFT, BOFT, full) or LoRA network into a checkpoint.

    python scripts/locon_loha_merge.py --base model.safetensors --lycoris loha.safetensors \\
        --save_to merged.safetensors --weight 0.8

The base is a single-file SD1/SD2/SDXL checkpoint or a FLUX.1 transformer (BFL layout, all-in-one files too); the
output keeps its other keys and dtypes (float8 weights become bf16), or --dtype casts every floating tensor (fp8:
float8 e4m3 as ComfyUI's fp8 files). A .safetensors checkpoint is streamed tensor by tensor: a 12B FLUX.1 model is
never held in memory. LoHa and decomposed LoKr are scaled by alpha/rank once (the LyCORIS library's own merge
squares it).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _tool_cli as cli  # noqa: E402

TOOL = "locon_loha_merge"


def build_parser():
    p = cli.ToolParser(prog="locon_loha_merge.py", description=__doc__.split("\n\n")[0],
                       epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("--base", help="single-file SD1/SD2/SDXL checkpoint or FLUX.1 BFL file (.safetensors or .ckpt)")
    p.add_argument("--lycoris", help="the network file")
    p.add_argument("--save_to", help="output checkpoint (.safetensors or .ckpt)")
    p.add_argument("--weight", type=float, default=1.0, help="multiplier of the network (any real number; default 1)")
    p.add_argument("--is_v2", action="store_true", help="the checkpoint is SD2 (checked; detected anyway)")
    p.add_argument("--dtype", default=None, choices=("float", "fp16", "bf16", "fp8"),
                   help="cast the output's floating tensors (default: keep each tensor's dtype, float8 -> bf16)")
    cli.add_common(p, precision_flag=None)
    return p


def main(argv=None) -> int:
    args = cli.parse_args(build_parser, TOOL, argv)
    if args is None:
        return 0
    cli.require_args(args, ("base", "lycoris", "save_to"))
    cli.require_file(args.base, "base", "checkpoint")
    cli.require_file(args.lycoris, "lycoris", "network file")
    from sd_scripts.networks.tool_io import check_output_path

    check_output_path(args.save_to, "save_to", args.overwrite, exts=(".safetensors", ".ckpt"))
    device = cli.check_device(args.device)
    from sd_scripts.networks.lycoris_merge import merge_lycoris_file

    report = merge_lycoris_file(args.base, args.lycoris, args.save_to, args.weight, args.is_v2 or None, args.dtype,
                                device, args.overwrite)
    for label, count in report.merged.items():
        missing = report.unmatched.get(label) or []
        note = f"; {len(missing)} modules match no layer (first: {missing[0]})" if missing else ""
        print(f"merged {label}: {count} modules{note}")
    print(f"saved {args.save_to}: {report.weights_changed} weights changed")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
