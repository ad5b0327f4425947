"""The user's error and warning lines read as they did before the engine was restructured (commit 123ef47).

``messages_golden.json`` holds, for a battery of bad inputs (every declared number below and above its range, bad
choices, bad paths, the rules between settings, kohya's ``--config_file`` with values of the wrong type, dataset
folders and dataset TOML files, JSON files of ours, the 2023 tool's and the kohya_ss GUI's), the exit code and the
``error:``/``warning:`` lines that ``main.py``, ``train_network.py`` and ``sdxl_train_network.py`` printed at 123ef47
(written by running :func:`run_case` in a checkout of that commit). Each case runs in this process against an empty
base-model folder, so preflight always stops before a model loads; ``golden["warnings"]`` cases run the same settings
up to preflight with a tiny model and compare the front end's and the plan's warnings.

Kept differences: the order of several errors printed together, where ``order_changed`` says so (the declared checks
run in declaration order); the lines in ``dropped``, the dataset scan's second report of a batch size or prior loss
weight that preflight reports already. Cases whose messages changed with features added since (FLUX.1 sample-prompt
options and family, torch_compile, cpu_offload_checkpointing) are not in the battery.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest

GOLDEN = json.loads((Path(__file__).parent / "messages_golden.json").read_text(encoding="utf-8"))
_LINE = re.compile(r"^(error|warning): |^\S+\.py: error: ")


def make_fixtures(root: Path) -> None:
    """The files the cases name: empty model folders, a two-image dataset, prompt files, a file and a folder."""
    from PIL import Image

    for name in ("sd1", "sd2", "sdxl", "adir"):
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / "data/10_cat").mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (i * 50, 100, 150)).save(root / f"data/10_cat/img{i}.png")
        (root / f"data/10_cat/img{i}.txt").write_text("cat, sitting, red", encoding="utf-8")
    (root / "reg/1_cat").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64)).save(root / "reg/1_cat/r.png")
    (root / "prompts.txt").write_text("a cat --w 64 --h 64\n", encoding="utf-8")
    (root / "empty_prompts.txt").write_text("", encoding="utf-8")
    (root / "afile.txt").write_text("x", encoding="utf-8")


def _write_case_files(root: Path, files: dict, model: Path | None = None) -> None:
    shutil.rmtree(root / "case", ignore_errors=True)
    shutil.rmtree(root / "out", ignore_errors=True)
    (root / "case").mkdir()
    for path, content in files.items():
        target = Path(path.replace("{tmp}", str(root)))
        target.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            target.mkdir(parents=True, exist_ok=True)
        elif isinstance(content, dict):
            from PIL import Image

            Image.new(content.get("mode", "RGB"), tuple(content["image"])).save(target)
        else:
            if model is not None:
                content = content.replace("{tmp}/sd1", str(model))
            target.write_text(content.replace("{tmp}", str(root)), encoding="utf-8")


def run_case(root: Path, case: dict) -> tuple[int, list[str]]:
    """Run one case through its entry point in this process: (exit code, its error and warning lines with the
    fixture folder written as {tmp})."""
    import frontend.app
    import sd_scripts.sdxl_train_network
    import sd_scripts.train_network

    _write_case_files(root, case.get("files") or {})
    argv = [a.replace("{tmp}", str(root)) for a in case["argv"]]
    entry = {"main": frontend.app.run_main, "kohya": sd_scripts.train_network.main,
             "sdxl": sd_scripts.sdxl_train_network.main}[case["entry"]]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = entry(argv)
        except SystemExit as exit_:
            rc = exit_.code
    lines = [line.replace(str(root), "{tmp}") for line in err.getvalue().splitlines() if _LINE.match(line)]
    return rc, lines


def plan_warnings(root: Path, model: Path, case: dict) -> list[str]:
    """The warnings of the case's settings up to and including preflight (the front end's, then the plan's)."""
    _write_case_files(root, case.get("files") or {}, model)
    argv = [a.replace("{tmp}/sd1", str(model)).replace("{tmp}", str(root)) for a in case["argv"]]
    if case["entry"] == "main":
        from frontend.cli import parse_command_line
        from frontend.resolve import resolve_settings, validate_store
        from frontend.training import prepare_training

        resolved = resolve_settings(parse_command_line(argv)[0])
        validate_store(resolved.store)
        with contextlib.redirect_stdout(io.StringIO()):
            _, plan = prepare_training(resolved.store)
        found = list(resolved.warnings) + list(plan.warnings)
    else:
        from sd_scripts.train_network import config_from_args
        from sd_scripts.training.preflight import preflight

        found = list(preflight(config_from_args(argv)).warnings)
    return [w.replace(str(model), "{model}").replace(str(root), "{tmp}") for w in found]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("messages")
    make_fixtures(folder)
    return folder


def test_the_battery_covers_every_kind_of_input():
    ids = [case["id"] for case in GOLDEN["errors"]]
    assert len(ids) == len(set(ids))
    for prefix in ("main-", "kohya-", "sdxl-", "json-", "main-d-", "kohya-t-", "kohya-c-config_file"):
        assert any(i.startswith(prefix) for i in ids), prefix


def test_error_lines_read_as_before(root):
    differ = []
    for case in GOLDEN["errors"]:
        rc, lines = run_case(root, case)
        expected = [line for line in case["lines"] if not line.startswith(tuple(GOLDEN["dropped"]))]
        same = lines == expected if case["id"] not in GOLDEN["order_changed"] else sorted(lines) == sorted(expected)
        if rc != case["rc"] or not same:
            differ.append(f"{case['id']}: exit {rc} (was {case['rc']})\n  now: {lines}\n  was: {expected}")
    assert not differ, "\n".join(differ)


def test_warnings_read_as_before(root, tiny_sd1_diffusers):
    differ = []
    for case in GOLDEN["warnings"]:
        found = plan_warnings(root, tiny_sd1_diffusers, case)
        if found != case["warnings"]:
            differ.append(f"{case['id']}\n  now: {found}\n  was: {case['warnings']}")
    assert not differ, "\n".join(differ)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_a_warmup_that_is_not_finite_is_one_line_too(root, value):
    """At 123ef47 these crashed with a traceback (int(inf)); they get the line a text value gets."""
    case = {"entry": "kohya", "argv": ["--pretrained_model_name_or_path", "{tmp}/sd1", "--train_data_dir",
                                       "{tmp}/data", "--output_dir", "{tmp}/out", f"--lr_warmup_steps={value}"]}
    rc, lines = run_case(root, case)
    assert rc == 2
    assert lines == [f"error: lr_warmup_steps: {value!r} is not a number of steps, a ratio below 1 or N%"]
