#!/usr/bin/env python
"""Resize a LoRA / LoCon (Tucker too) / LoHa / LoKr to a lower rank, keeping its strength.

    python scripts/lora_resize.py --model in.safetensors --save_to out.safetensors --new_rank 16
    python scripts/lora_resize.py --model in.safetensors --save_to out.safetensors \\
        --new_rank 64 --dynamic_method sv_fro --dynamic_param 0.9 --verbose
    python scripts/lora_resize.py --model in.safetensors --save_to outdir/ --new_rank 32 16 8
    python scripts/lora_resize.py --model in.safetensors --save_to outdir/ --queue examples/resize_queue_fixed.txt

Several ranks (or a --queue txt file: "rank" per line, or "param max_rank" per line with
--dynamic_method) make one file each, named <name>-<mode>-<rank> / <name>-<mode>-<param>-<rank>;
a failing entry is reported and the rest go on. Dynamic methods choose each module's rank from
its singular values (sv_ratio: largest/smallest kept >= 1; sv_fro, sv_cumulative: a fraction in
(0, 1]), never above --new_rank nor the module's own rank.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _tool_cli as cli  # noqa: E402

TOOL = "lora_resize"


def build_parser():
    p = cli.ToolParser(prog="lora_resize.py", description=__doc__.split("\n\n")[0],
                       epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("--model", help="LoRA file to resize (.safetensors, .ckpt, .pt)")
    p.add_argument("--save_to", help="output file; with several ranks or --queue, a folder or a base name")
    p.add_argument("--new_rank", type=int, nargs="+", help="rank (the cap with --dynamic_method); several values make a queue")
    p.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3 conv modules (default: --new_rank)")
    p.add_argument("--dynamic_method", choices=("sv_ratio", "sv_fro", "sv_cumulative"), default=None,
                   help="choose each module's rank from its singular values")
    p.add_argument("--dynamic_param", type=float, nargs="+", default=None, help="the method's target; several make a queue")
    p.add_argument("--queue", default=None, help="txt file: 'rank' per line, or 'param max_rank' per line with --dynamic_method")
    p.add_argument("--verbose", action="store_true", help="print each module's retained Frobenius norm and the average")
    cli.add_common(p)
    return p


def _entries(args) -> list[tuple[str, object]]:
    """``[(label, (new_rank, param) or error text)]`` for every resize to do."""
    from sd_scripts.core.errors import ConfigError

    dynamic = args.dynamic_method is not None
    if args.queue:
        if args.new_rank or args.dynamic_param:
            raise ConfigError("queue: give the ranks either in --queue or on the command line, not both", setting="queue")
        out = []
        for number, fields, raw in cli.read_queue(args.queue, (2,) if dynamic else (1,)):
            label = f"line {number} ({raw})"
            if fields is None:
                want = "'param max_rank'" if dynamic else "one rank"
                out.append((label, f"queue: {args.queue} line {number}: expected {want}, got {raw!r}"))
                continue
            try:
                entry = (int(fields[1]), float(fields[0])) if dynamic else (int(fields[0]), None)
            except ValueError:
                out.append((label, f"queue: {args.queue} line {number}: {raw!r} is not a number"))
                continue
            out.append((label, entry))
        return out
    if not args.new_rank:
        raise ConfigError("new_rank: missing; add --new_rank N (or a --queue file)", setting="new_rank")
    if not dynamic:
        if args.dynamic_param:
            raise ConfigError("dynamic_param: given without --dynamic_method; add --dynamic_method sv_ratio|sv_fro|sv_cumulative",
                              setting="dynamic_param")
        return [(f"rank {r}", (r, None)) for r in args.new_rank]
    if not args.dynamic_param:
        raise ConfigError(f"dynamic_param: --dynamic_method {args.dynamic_method} needs --dynamic_param", setting="dynamic_param")
    ranks = args.new_rank
    params = args.dynamic_param
    if len(ranks) == 1:
        ranks = ranks * len(params)
    if len(ranks) != len(params):
        raise ConfigError(f"new_rank: {len(params)} --dynamic_param values but {len(ranks)} --new_rank values; "
                          "give one max rank, or one per param", setting="new_rank")
    return [(f"{args.dynamic_method} {p} max rank {r}", (r, p)) for r, p in zip(ranks, params)]


def _print_verbose(result, dynamic: bool) -> None:
    for m in result.modules:
        line = (f"{m.name:75} | sum(S) retained: {m.sum:.1%}, fro retained: {m.fro:.1%}, "
                f"max(S) ratio: {m.max_ratio:0.1f}")
        if dynamic:
            line += f", dynamic | dim: {m.new_rank}, alpha: {m.alpha:g}"
        print(line)
    for name in result.copied:
        print(f"{name:75} | copied unchanged (no rank)")
    print(f"Average Frobenius norm retention: {result.mean_fro:.2%} | std: {result.std_fro:0.3f}")


def main(argv=None) -> int:
    args = cli.parse_args(build_parser, TOOL, argv)
    if args is None:
        return 0
    from sd_scripts.core.errors import ConfigError, UserError

    if not args.model:
        raise ConfigError("model: missing; add --model LORA.safetensors", setting="model")
    if not args.save_to:
        raise ConfigError("save_to: missing; add --save_to OUT.safetensors", setting="save_to")
    cli.require_file(args.model, "model", "LoRA file")
    entries = _entries(args)
    mode = args.dynamic_method or "fixed"
    many = len(entries) > 1 or bool(args.queue)
    to_folder = str(args.save_to).endswith(("/", "\\")) or os.path.isdir(args.save_to)
    if not (many or to_folder):
        from sd_scripts.networks.tool_io import check_output_path

        check_output_path(args.save_to, "save_to", args.overwrite)
    device = cli.check_device(args.device)
    from sd_scripts.networks.resize import resize_lora_file

    failed = 0
    for label, entry in entries:
        if isinstance(entry, str):
            cli.say_error(f"skipped {label}: {entry}")
            failed += 1
            continue
        rank, param = entry
        if many or to_folder:
            parts = [mode, param, rank] if param is not None else [mode, rank]
            out = cli.queue_output_path(args.save_to, args.model, parts)
        else:
            out = args.save_to
        try:
            from sd_scripts.networks.tool_io import check_output_path

            check_output_path(out, "save_to", args.overwrite)
            result = resize_lora_file(args.model, out, rank, args.new_conv_rank, args.dynamic_method, param,
                                      args.save_precision, device)
        except UserError as err:
            if not many:
                raise
            cli.say_error(f"skipped {label}: {err}")
            failed += 1
            continue
        if args.verbose:
            _print_verbose(result, param is not None)
        ranks = sorted({m.new_rank for m in result.modules})
        shown = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        print(f"saved {out}: {len(result.modules)} modules, rank {shown}, "
              f"mean Frobenius norm retained {result.mean_fro:.2%}")
    if failed:
        cli.say_error(f"{failed} of {len(entries)} resizes failed")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
