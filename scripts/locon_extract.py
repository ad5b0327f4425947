#!/usr/bin/env python
"""Extract a LoRA / LoCon from the difference between two checkpoints (tuned - base).

    python scripts/locon_extract.py --base sd15.safetensors --tuned mymodel.safetensors \\
        --save_to mymodel_locon.safetensors --mode fixed --linear_param 64 --conv_param 32
    python scripts/locon_extract.py --base sd15.safetensors --tuned mymodel.safetensors \\
        --save_to out/ --mode ratio --queue examples/extract_queue.txt

Modes (as LyCORIS' extract tool): fixed (ranks), threshold (keep singular values above the value),
ratio (above this fraction of the largest), quantile (the values whose running sum stays below
this share of the total). LyCORIS' names work too: --linear_dim/--conv_dim (fixed),
--linear_threshold/--conv_threshold, --linear_ratio/--conv_ratio, --linear_quantile/--conv_quantile.
Without a conv value only linear and 1x1 layers are extracted (a LoRA); with one, 3x3 convs too
(a LoCon). Several values, or a --queue txt file with "linear conv" per line, make one file each,
named <name>-<mode>-<linear>-<conv>; a failing entry is reported and the rest go on.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _tool_cli as cli  # noqa: E402

TOOL = "locon_extract"
MODES = ("fixed", "threshold", "ratio", "quantile")
_ALIASES = {"dim": "fixed", "threshold": "threshold", "ratio": "ratio", "quantile": "quantile"}


def build_parser():
    p = cli.ToolParser(prog="locon_extract.py", description=__doc__.split("\n\n")[0],
                       epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("--base", "--model_org", dest="base", help="the original checkpoint (single-file SD1/SD2/SDXL, or a FLUX.1 transformer in BFL layout)")
    p.add_argument("--tuned", "--model_tuned", dest="tuned", help="the fine-tuned checkpoint")
    p.add_argument("--save_to", help="output file; with several values or --queue, a folder or a base name")
    p.add_argument("--mode", choices=MODES, default=None, help="how each module's rank is chosen (default fixed)")
    p.add_argument("--linear_param", type=float, nargs="+", default=None, help="value for linear and 1x1 layers")
    p.add_argument("--conv_param", type=float, nargs="+", default=None, help="value for 3x3 convs (none: no conv layers)")
    for kind in ("linear", "conv"):
        for alias in _ALIASES:
            p.add_argument(f"--{kind}_{alias}", type=float, nargs="+", default=None, help=argparse.SUPPRESS)
    p.add_argument("--queue", default=None, help="txt file: 'linear conv' per line (or 'linear')")
    p.add_argument("--clamp_quantile", type=float, default=None,
                   help="clamp the factors at this quantile of their absolute values (kohya uses 0.99; default off)")
    p.add_argument("--min_diff", type=float, default=None,
                   help="keep a text-encoder module when its largest difference exceeds this (default 0.001)")
    p.add_argument("--is_v2", "--v2", dest="is_v2", action="store_true", help="the checkpoints are SD2 (checked; detected anyway)")
    p.add_argument("--verbose", action="store_true", help="print each module's rank and relative error")
    cli.add_common(p)
    return p


def _resolve(args):
    """``(mode, linear values, conv values)`` from --mode/--*_param and the LyCORIS names."""
    from sd_scripts.core.errors import ConfigError

    mode = args.mode
    linear, conv = args.linear_param, args.conv_param
    for kind in ("linear", "conv"):
        for alias, alias_mode in _ALIASES.items():
            values = getattr(args, f"{kind}_{alias}")
            if values is None:
                continue
            if mode is not None and mode != alias_mode:
                raise ConfigError(f"{kind}_{alias}: belongs to --mode {alias_mode}, but --mode is {mode}", setting="mode")
            mode = alias_mode
            if kind == "linear":
                if linear is not None:
                    raise ConfigError(f"linear_param: given twice (--linear_param and --linear_{alias})", setting="linear_param")
                linear = values
            else:
                if conv is not None:
                    raise ConfigError(f"conv_param: given twice (--conv_param and --conv_{alias})", setting="conv_param")
                conv = values
    return mode or "fixed", linear, conv


def _entries(args, mode, linear, conv):
    from sd_scripts.core.errors import ConfigError

    def value(v):
        return int(v) if mode == "fixed" and float(v).is_integer() else float(v)

    if args.queue:
        if linear or conv:
            raise ConfigError("queue: give the values either in --queue or on the command line, not both", setting="queue")
        out = []
        for number, fields, raw in cli.read_queue(args.queue, (1, 2)):
            label = f"line {number} ({raw})"
            if fields is None:
                out.append((label, f"queue: {args.queue} line {number}: expected 'linear conv', got {raw!r}"))
                continue
            try:
                out.append((label, (value(fields[0]), value(fields[1]) if len(fields) > 1 else None)))
            except ValueError:
                out.append((label, f"queue: {args.queue} line {number}: {raw!r} is not a number"))
        return out
    if not linear:
        raise ConfigError("linear_param: missing; add --linear_param X (or --linear_dim for fixed ranks, or a --queue)",
                          setting="linear_param")
    convs = conv if conv else [None] * len(linear)
    if len(convs) == 1 and len(linear) > 1:
        convs = convs * len(linear)
    if len(convs) != len(linear):
        raise ConfigError(f"conv_param: {len(convs)} conv values for {len(linear)} linear values; give one, or one each",
                          setting="conv_param")
    return [(f"{mode} {lv} {cv}", (value(lv), value(cv) if cv is not None else None)) for lv, cv in zip(linear, convs)]


def main(argv=None) -> int:
    args = cli.parse_args(build_parser, TOOL, argv)
    if args is None:
        return 0
    from sd_scripts.core.errors import ConfigError, UserError

    cli.require_args(args, ("base", "tuned", "save_to"))
    cli.require_file(args.base, "base", "checkpoint")
    cli.require_file(args.tuned, "tuned", "checkpoint")
    mode, linear, conv = _resolve(args)
    entries = _entries(args, mode, linear, conv)
    device = cli.check_device(args.device)
    from sd_scripts.networks.extract import DEFAULT_MIN_DIFF, check_extract_args, extract_lora_file
    from sd_scripts.networks.tool_io import check_output_path, read_checkpoint_pair

    many = len(entries) > 1 or bool(args.queue)
    to_folder = str(args.save_to).endswith(("/", "\\")) or os.path.isdir(args.save_to)
    plans = []
    for label, entry in entries:
        if isinstance(entry, str):
            plans.append((label, entry, None))
            continue
        lin, cv = entry
        out = (cli.queue_output_path(args.save_to, args.tuned, [mode, lin] + ([cv] if cv is not None else []))
               if many or to_folder else args.save_to)
        try:
            check_extract_args(mode, lin, cv)
            check_output_path(out, "save_to", args.overwrite)
        except UserError as err:
            if not many:
                raise
            plans.append((label, str(err), None))
            continue
        plans.append((label, entry, out))
    failed = sum(1 for _, entry, _ in plans if isinstance(entry, str))
    if failed == len(plans):
        for label, message, _ in plans:
            cli.say_error(f"skipped {label}: {message}")
        raise ConfigError(f"queue: none of the {len(plans)} entries can run", setting="queue")
    base_sd, tuned_sd, family = read_checkpoint_pair(args.base, args.tuned)
    min_diff = DEFAULT_MIN_DIFF if args.min_diff is None else args.min_diff
    for label, entry, out in plans:
        if isinstance(entry, str):
            cli.say_error(f"skipped {label}: {entry}")
            continue
        lin, cv = entry
        try:
            result = extract_lora_file(args.base, args.tuned, out, mode, lin, cv, args.clamp_quantile, min_diff,
                                       args.is_v2 or None, args.save_precision, device, args.overwrite,
                                       checkpoints=(base_sd, tuned_sd, family))
        except UserError as err:
            if not many:
                raise
            cli.say_error(f"skipped {label}: {err}")
            failed += 1
            continue
        if args.verbose:
            for m in result.modules:
                how = "" if m.exact else " (randomized SVD)"
                print(f"{m.name:75} | rank {m.rank:4d}, relative error {m.rel_error:.2%}{how}")
            if result.skipped_te:
                print(f"{len(result.skipped_te)} text-encoder modules differ by at most {min_diff}: not extracted")
        errs = [m.rel_error for m in result.modules]
        ranks = sorted({m.rank for m in result.modules})
        shown = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        te = sum(1 for m in result.modules if m.part == "te")
        print(f"saved {out}: {len(result.modules)} modules ({te} text encoder), rank {shown}, "
              f"mean relative error {sum(errs) / len(errs):.2%}")
    if failed:
        cli.say_error(f"{failed} of {len(plans)} extractions failed")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
