"""Run the catalogue of bad inputs (``cases.py``) through main.py, the engine's command line and the
side tools: exit code 2, one line per problem on stderr naming the setting, no traceback, nothing
written (the case's folder, dataset included, is byte-identical afterwards; no output folder).

Most cases run in this process (``frontend.app.run_main``, ``sd_scripts.train_network.main``, each
tool's ``main`` through ``_tool_cli.run``) so torch is imported once; the cases marked
``subprocess`` run as real processes, all started together.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from tests.bad_inputs.cases import CASES, ENGINE_BASE, MAIN_BASE, SUBSET, Case, json_text
from tests.helpers import make_dataset

ROOT = Path(__file__).resolve().parents[2]
BY_ID = {case.id: case for case in CASES}
DEPRECATED = {"use_8bit_adam", "use_lion", "locon", "locon_dim", "locon_alpha"}
Outcome = namedtuple("Outcome", "rc stdout stderr")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    """Shared read-only inputs: a tiny SD1 checkpoint with its tokenizer, a small LoRA."""
    from sd_scripts.files.lora_file import save_lora_file
    from sd_scripts.testing.tiny_models import save_tiny_single_file, tiny_tokenizer_cache_dir
    from tests import lora_synth

    folder = tmp_path_factory.mktemp("bad_inputs_assets")
    model = save_tiny_single_file(folder / "model.safetensors", "sd1")
    lora = folder / "style.safetensors"
    save_lora_file(lora, lora_synth.mixed_lora(seed=1, r=4, conv_r=2, alpha=2.0, conv_alpha=1.0), {"ss_network_dim": "4"})
    return {"assets": str(folder), "model": str(model), "tok": str(tiny_tokenizer_cache_dir(model)), "lora": str(lora)}


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "<dir>"
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as handle:
                out[os.path.relpath(p, root)] = hashlib.sha256(handle.read()).hexdigest()
    return out


def _prepare(case: Case, base: Path, assets: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Make the case's folder; return its argv and placeholder values."""
    ws = base / case.id
    ws.mkdir(parents=True)
    data = make_dataset(ws / "data", folder=SUBSET, count=3)
    values = dict(assets, ws=str(ws), data=str(data), out=str(ws / "out"))
    if case.dataset is not None:
        case.dataset(data)
    for name, content in case.files.items():
        path = ws / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.format(**values), encoding="utf-8")
    text = json_text(case, values)
    extra = list(case.args)
    if text is not None:
        (ws / "job.json").write_text(text, encoding="utf-8")
        extra = ["--load_json_path", "{ws}/job.json", *extra]
    base_argv = {"main": MAIN_BASE, "engine": ENGINE_BASE}.get(case.runner, [])
    argv = []
    skip = False
    for i, item in enumerate(base_argv):
        if skip:
            skip = False
            continue
        if item in case.drop:
            skip = i + 1 < len(base_argv) and not base_argv[i + 1].startswith("--")
            continue
        argv.append(item)
    argv += extra
    return [a.format(**values) for a in argv], values


def _load_tool(name: str):
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_catalogue_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_in_process(case: Case, argv: list[str], monkeypatch) -> Outcome:
    if case.disk_free is not None:
        real = shutil.disk_usage
        usage = namedtuple("usage", "total used free")

        def fake(path):
            total = real(path).total
            return usage(total, total - case.disk_free, case.disk_free)

        monkeypatch.setattr(shutil, "disk_usage", fake)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if case.runner == "main":
                from frontend.app import run_main

                rc = run_main(argv)
            elif case.runner == "engine":
                from sd_scripts.train_network import main as engine_main

                rc = engine_main(argv)
            else:
                tool = _load_tool(case.runner.split(":", 1)[1])
                rc = tool.cli.run(tool.main, argv)
        except SystemExit as exit_:  # argparse errors
            rc = exit_.code
    return Outcome(rc, out.getvalue(), err.getvalue())


def _command(case: Case, argv: list[str]) -> list[str]:
    if case.runner == "main":
        script = ROOT / "main.py"
    elif case.runner == "engine":
        script = ROOT / "sd_scripts" / "train_network.py"
    else:
        script = ROOT / "scripts" / f"{case.runner.split(':', 1)[1]}.py"
    return [sys.executable, str(script), *argv]


@pytest.fixture(scope="module")
def subprocess_outcomes(assets, tmp_path_factory) -> dict[str, tuple[Outcome, Path, dict, dict]]:
    """Every ``subprocess`` case, started together; (outcome, folder, snapshot before, values)."""
    base = tmp_path_factory.mktemp("bad_inputs_sub")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    started = {}
    for case in CASES:
        if not case.subprocess or (case.cpu_only and _cuda()):
            continue
        argv, values = _prepare(case, base, assets)
        ws = base / case.id
        before = _snapshot(ws)
        proc = subprocess.Popen(_command(case, argv), cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        started[case.id] = (proc, ws, before, values)
    results = {}
    for case_id, (proc, ws, before, values) in started.items():
        out, err = proc.communicate(timeout=300)
        results[case_id] = (Outcome(proc.returncode, out, err), ws, before, values)
    return results


# ------------------------------------------------------------------------------------------- checks


def _check(case: Case, outcome: Outcome, ws: Path, before: dict, assets_before: dict | None, assets) -> None:
    shown = f"{case.id}: rc={outcome.rc}\nstdout: {outcome.stdout[-1500:]}\nstderr: {outcome.stderr[-1500:]}"
    assert outcome.rc == 2, shown
    assert "Traceback" not in outcome.stdout + outcome.stderr, shown
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    others = [line for line in lines if not line.startswith(("error:", "warning:"))]
    assert not others, shown  # every stderr line is one whole message
    assert len(errors) == case.errors, shown
    for line in errors:  # the ArgStore name added to an engine message is never a deprecated one
        named = line.rpartition("(in ArgsList.py and JSON files: ")[2].rstrip(")")
        assert named not in DEPRECATED, line
    for expected in (case.expect, *case.also):
        assert any(all(needle in line for needle in expected) for line in errors), (expected, shown)
    after = _snapshot(ws)
    assert after == before, f"{case.id}: files changed: {sorted(set(after.items()) ^ set(before.items()))[:6]}"
    assert not (ws / "out").exists()
    if assets_before is not None:
        assert _snapshot(Path(assets["assets"])) == assets_before


IN_PROCESS = [c.id for c in CASES if not c.subprocess]
SUBPROCESS = [c.id for c in CASES if c.subprocess]


@pytest.mark.parametrize("case_id", IN_PROCESS)
def test_bad_input_in_process(case_id, assets, tmp_path, monkeypatch):
    case = BY_ID[case_id]
    if case.cpu_only and _cuda():
        pytest.skip("an error only without CUDA")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assets_before = _snapshot(Path(assets["assets"]))
    argv, _ = _prepare(case, tmp_path, assets)
    ws = tmp_path / case.id
    before = _snapshot(ws)
    monkeypatch.chdir(ws)
    outcome = _run_in_process(case, argv, monkeypatch)
    _check(case, outcome, ws, before, assets_before, assets)


@pytest.mark.parametrize("case_id", SUBPROCESS)
def test_bad_input_as_a_process(case_id, subprocess_outcomes, assets):
    case = BY_ID[case_id]
    if case_id not in subprocess_outcomes:
        pytest.skip("an error only without CUDA")
    outcome, ws, before, values = subprocess_outcomes[case_id]
    _check(case, outcome, ws, before, None, assets)
    assert not Path(values["ws"], "evil.ckpt.pwned").exists()


def test_catalogue_is_big_and_covers_every_runner():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    runners = {c.runner.split(":")[0] for c in CASES}
    assert runners == {"main", "engine", "tool"}
    assert {c.runner for c in CASES if c.runner.startswith("tool:")} == {
        "tool:lora_resize", "tool:lora_merge", "tool:locon_extract", "tool:locon_loha_merge", "tool:image_resize"}
    assert 4 <= len(SUBPROCESS) <= 10


# ------------------------------------------------------------------------------------------- the control


def _prepare_training(argv: list[str]):
    from frontend.cli import parse_command_line
    from frontend.resolve import resolve_settings, validate_store
    from frontend.training import prepare_training

    given, _ = parse_command_line(argv)
    store = resolve_settings(given).store
    validate_store(store)
    said: list[str] = []
    mapped, plan = prepare_training(store, say=said.append)
    return mapped, plan, said


def test_the_base_settings_pass_preflight(assets, tmp_path, monkeypatch):
    """Each case changes one thing in a run that is otherwise fine; preflight writes nothing."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv, values = _prepare(Case("control", ()), tmp_path, assets)
    before = _snapshot(tmp_path)
    mapped, plan, said = _prepare_training(argv)
    assert plan.family.name == "sd1"
    assert plan.dataset.num_train_images == 15
    assert plan.summary == ["dataset: 3 training image(s) in 1 folder(s), 15 with repeats"]
    assert plan.disk and plan.disk[0].setting == "output_dir" and plan.disk[0].bytes > 0
    assert _snapshot(tmp_path) == before


def test_fp16_and_xformers_without_cuda_fall_back_with_a_note_in_main(assets, tmp_path, monkeypatch):
    """README: without a CUDA GPU main.py turns fp16 into no and xformers off, also when asked for explicitly."""
    if _cuda():
        pytest.skip("the fallback happens only without CUDA")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv, values = _prepare(Case("fallback", (), drop=("--mixed_precision", "--xformers")), tmp_path, assets)
    job = Path(values["ws"]) / "job.json"
    job.write_text('{"mixed_precision": "fp16", "xformers": true}', encoding="utf-8")
    for extra in (["--mixed_precision", "fp16", "--xformers", "true"], ["--load_json_path", str(job)]):
        mapped, plan, said = _prepare_training(argv + extra)
        assert mapped.config.mixed_precision == "no" and mapped.config.xformers is False
        assert any("mixed_precision fp16 -> no" in line and "xformers -> off" in line for line in said), said
        assert any(line.startswith("dataset: 3 training image(s)") for line in said), said


def test_missing_captions_and_hidden_files_are_counted_not_fatal(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv, values = _prepare(Case("captions", ()), tmp_path, assets)
    sub = Path(values["data"]) / SUBSET
    (sub / "img00.txt").unlink()
    (sub / "img01.txt").unlink()
    (sub / "._img00.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (sub / "Thumbs.db").write_bytes(b"\x00" * 32)
    (sub / ".DS_Store").write_bytes(b"\x00" * 32)
    mapped, plan, _ = _prepare_training(argv)
    assert plan.dataset.skipped == []  # the junk files are not even looked at
    assert len(plan.dataset.images) == 3
    assert plan.summary == ["dataset: 3 training image(s) in 1 folder(s), 15 with repeats; 2 without a caption file "
                            "(2 use their folder's class tokens)"]
    assert any("2 of 3 images" in w and "img00.png" in w for w in plan.warnings), plan.warnings
