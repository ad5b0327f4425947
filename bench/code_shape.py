"""The shape of the engine's code: the largest modules and the longest functions.

    .venv/bin/python bench/code_shape.py [--top 15] [--root sd_scripts] [--over-lines 600] [--over-function 80]

Counts every line of each ``.py`` file (docstrings and comments included, as an editor shows them) and, for each
function or method, the lines from its ``def`` (decorators included) to its last line. Nested functions count inside
their parent too. Also prints how many ``getattr(config, ...)`` calls the engine makes and how many modules and
functions are over the limits.
"""

from __future__ import annotations

import argparse
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_files(folder: str) -> list[str]:
    out = []
    for base, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
        out += [os.path.join(base, f) for f in sorted(files) if f.endswith(".py")]
    return out


def functions_of(tree: ast.AST, prefix: str = ""):
    """(qualified name, lines) of every function in ``tree``, methods named ``Class.method``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            yield prefix + node.name, node.end_lineno - start + 1
            yield from functions_of(node, prefix + node.name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from functions_of(node, prefix + node.name + ".")
        else:
            yield from functions_of(node, prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="sd_scripts", help="folder to measure, relative to the repository")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--over-lines", type=int, default=600)
    parser.add_argument("--over-function", type=int, default=80)
    args = parser.parse_args(argv)
    modules, functions, getattrs = [], [], 0
    for path in python_files(os.path.join(ROOT, args.root)):
        rel = os.path.relpath(path, ROOT)
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        modules.append((text.count("\n"), rel))
        getattrs += len(re.findall(r"getattr\(\s*(?:self\.)?config\s*,", text))
        functions += [(lines, f"{rel}:{name}") for name, lines in functions_of(ast.parse(text))]
    modules.sort(reverse=True)
    functions.sort(reverse=True)
    print(f"largest modules ({len(modules)} in {args.root}/, {sum(n for n, _ in modules)} lines):")
    for lines, rel in modules[:args.top]:
        print(f"  {lines:6d}  {rel}")
    print(f"longest functions ({len(functions)}):")
    for lines, name in functions[:args.top]:
        print(f"  {lines:6d}  {name}")
    print(f"modules over {args.over_lines} lines: {sum(n > args.over_lines for n, _ in modules)}")
    print(f"functions over {args.over_function} lines: {sum(n > args.over_function for n, _ in functions)}")
    print(f"getattr(config, ...) calls: {getattrs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
