"""main.py: every flag honoured, precedence, -h, saving JSON, bad input, --popup and the launchers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from ArgsList import GROUPS, ArgStore
from frontend.cli import parse_command_line
from frontend.fields import format_value
from frontend.resolve import resolve_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "main.py")
TOOLS = ("lora_resize", "lora_merge", "locon_extract", "locon_loha_merge", "image_resize", "edit_tags", "dataset_report",
         "tag_images", "caption_images")


def run_main(args, cwd, env=None):
    return subprocess.run([sys.executable, MAIN, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def files_under(folder) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names}


def _cli_text(info, value) -> list[str]:
    if info.kind == "dict":
        return [f"{k}={v}" for k, v in value.items()]
    if info.kind == "list":
        return list(value)
    return [format_value(value) if not isinstance(value, float) else repr(value)]


def test_every_setting_is_a_flag_and_is_honoured(tmp_path):
    from tests.test_json_io import _non_default

    argv, expected = [], {}
    for info in ArgStore.settings():
        value = _non_default(info, tmp_path)
        argv += [f"--{info.name}", *_cli_text(info, value)]
        expected[info.name] = value
    given, modes = parse_command_line(argv)
    assert modes == {}
    assert given == expected
    skip = ("load_json_path", "multi_run_folder", "use_lion")  # use_lion with use_8bit_adam is refused
    store = resolve_settings({k: v for k, v in given.items() if k not in skip}).store
    for name, value in expected.items():
        if name not in ("load_json_path", "multi_run_folder", "use_8bit_adam", "use_lion", "locon", "locon_dim",
                        "locon_alpha", "optimizer_type", "network_args", "caption_extention", "caption_extension"):
            assert getattr(store, name) == value, name
    # kohya's old misspelling is migrated, and wins over caption_extension as in kohya
    assert store.caption_extention is None and store.caption_extension == expected["caption_extention"]


def test_flag_spellings():
    given, _ = parse_command_line([
        "--xformers", "--cache_latents", "false", "--flip_aug", "0", "--unet_lr", "none", "--vae", "",
        "--optimizer_args", '{"weight_decay": "0.01"}', "--network_args", "algo=loha", "conv_dim=4",
        "--save_json_path", "js", "--multi_run_path", "queue", "--optimizer_type", "adamw8BIT",
        "--mixed_precision", "none", "--save_precision", "fp32", "--json_load_skip_list", "base_model",
        "img_folder", "--lr_scheduler_args", "--change_output_name", "none", "--popup",
    ])
    assert given == {
        "xformers": True, "cache_latents": False, "flip_aug": False, "unet_lr": None, "vae": None,
        "optimizer_args": {"weight_decay": "0.01"}, "network_args": {"algo": "loha", "conv_dim": "4"},
        "save_json_folder": "js", "multi_run_folder": "queue", "optimizer_type": "AdamW8bit",
        "mixed_precision": "no", "save_precision": "float", "json_load_skip_list": ["base_model", "img_folder"],
        "lr_scheduler_args": {}, "change_output_name": "none",
    }
    given, modes = parse_command_line(["--popup", "--optimizer_type", "my_pkg.optim.Sophia"])
    assert modes == {"popup": True} and given["optimizer_type"] == "my_pkg.optim.Sophia"


def test_precedence_is_command_line_over_json_over_defaults_key_by_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    defaults = ArgStore(net_dim=64, alpha=32, keep_tokens=2, cache_latents=True, flip_aug=False, unet_lr=None,
                        training_comment="from ArgsList", clip_skip=1)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"net_dim": 16, "keep_tokens": 3, "cache_latents": False, "flip_aug": True,
                               "unet_lr": 1e-4, "clip_skip": 2}), encoding="utf-8")
    given, _ = parse_command_line(["--load_json_path", str(job), "--keep_tokens", "0", "--flip_aug", "false",
                                   "--unet_lr", "none", "--learning_rate", "0"])
    store = resolve_settings(given, defaults).store
    assert store.alpha == 32  # ArgsList only
    assert store.training_comment == "from ArgsList"
    assert store.net_dim == 16 and store.clip_skip == 2  # JSON over ArgsList
    assert store.cache_latents is False  # a JSON false beats an ArgsList true
    assert store.keep_tokens == 0  # command line 0 beats JSON 3
    assert store.flip_aug is False  # command line false beats JSON true
    assert store.unet_lr is None  # command line "none" unsets a JSON value
    assert store.learning_rate == 0.0


def test_help_is_grouped_complete_and_does_not_import_torch():
    out = subprocess.run([sys.executable, MAIN, "-h"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for group in GROUPS:
        assert f"\n{group}:" in out.stdout, group
    for info in ArgStore.settings():
        assert f"--{info.name}" in out.stdout, info.name
    code = ("import runpy, sys\nsys.argv = ['main.py', '-h']\n"
            f"try:\n    runpy.run_path({MAIN!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('\\nimported:', 'torch' in sys.modules, 'diffusers' in sys.modules, "
            "'frontend.resolve' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    # nor the JSON readers and the rules: -h only builds the flags (issue 12: under 0.5 s; bench/startup.py)
    assert out.stdout.rstrip().endswith("imported: False False False"), out.stdout[-300:]


def _dataset(tmp_path):
    folder = tmp_path / "data" / "5_thing"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("thing, red", encoding="utf-8")
    return tmp_path / "data"


def test_save_json_only(tmp_path):
    data = _dataset(tmp_path)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    args = ["--base_model", str(model), "--img_folder", str(data), "--output_folder", str(tmp_path / "out"),
            "--save_json_path", str(tmp_path / "configs"), "--save_json_name", "first", "--save_json_only",
            "--keep_tokens", "0", "--cache_latents", "false"]
    out = run_main(args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    saved = os.listdir(tmp_path / "configs")
    assert len(saved) == 1 and saved[0].startswith("config-") and saved[0].endswith("-first.json")
    data = json.load(open(tmp_path / "configs" / saved[0], encoding="utf-8"))
    assert list(data) == ArgStore.setting_names()
    assert data["keep_tokens"] == 0 and data["cache_latents"] is False and data["save_json_only"] is False
    assert not (tmp_path / "out").exists()  # nothing trained
    # the saved file loads back to the same settings
    again = resolve_settings({"load_json_path": str(tmp_path / "configs" / saved[0])}).store
    assert again.keep_tokens == 0 and again.img_folder == str(tmp_path / "data")


BAD_INPUTS = {
    "malformed_json": (["--load_json_path", "{dir}/broken.json"], ["broken.json: not valid JSON at line 3, column 3"]),
    "wrong_type_in_json": (["--load_json_path", "{dir}/typed.json"],
                           ["typed.json: net_dim: expected an integer, got 'big'",
                            "typed.json: flip_aug: expected true/false, got 'sometimes'"]),
    "missing_required": (["--img_folder", "{dir}/data", "--output_folder", "{dir}/out"],
                         ["base_model: required; set it in ArgsList.py, in a JSON file or with --base_model"]),
    "path_not_found": (["--base_model", "{dir}/nope.safetensors", "--img_folder", "{dir}/nodata", "--output_folder",
                        "{dir}/out", "--vae", "{dir}/vae.pt"],
                       ["base_model: not found", "img_folder: folder not found", "vae: not found"]),
    "incompatible": (["--base_model", "{dir}/model.safetensors", "--img_folder", "{dir}/data", "--output_folder",
                      "{dir}/out", "--unet_only", "--text_only", "--random_crop"],
                     ["unet_only: cannot be combined with text_only", "random_crop: needs cache_latents false"]),
    "bad_flag_value": (["--net_dim", "lots"], ["argument --net_dim: expected an integer, got 'lots'"]),
    "unknown_flag": (["--nett_dim", "8"], ["unrecognized arguments: --nett_dim 8"]),
    "bad_choice": (["--scheduler", "cosin"], ["argument --scheduler: 'cosin' is not one of"]),
    "save_only_without_folder": (["--save_json_only"], ["save_json_only: set save_json_folder"]),
    "missing_json": (["--load_json_path", "{dir}/none.json"], ["load_json_path: file not found"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_each_exit_2_nothing_written(tmp_path, case):
    args, expected = BAD_INPUTS[case]
    _dataset(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / "broken.json").write_text('{\n  "net_dim": 8\n  "alpha": 4\n}', encoding="utf-8")
    (tmp_path / "typed.json").write_text(json.dumps({"net_dim": "big", "flip_aug": "sometimes"}), encoding="utf-8")
    before = files_under(tmp_path)
    args = [a.replace("{dir}", str(tmp_path)) for a in args]
    if case != "save_only_without_folder":
        args += ["--save_json_path", str(tmp_path / "configs")]  # a JSON would be saved if the run went on
    out = run_main(args, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected):
        assert line.startswith("error: ") and start in line, line
    assert files_under(tmp_path) == before


def test_popup_calls_the_wizard_when_there_is_one(tmp_path, monkeypatch, capsys):
    from frontend.app import run_main as app_main

    seen = {}

    def wizard(defaults):
        seen["defaults"] = defaults
        return defaults.replace(save_json_folder=str(tmp_path / "js"), save_json_only=True, net_dim=4,
                                base_model="runwayml/stable-diffusion-v1-5", img_folder=str(_dataset(tmp_path)),
                                output_folder=str(tmp_path / "out"))

    monkeypatch.setitem(sys.modules, "popups", types.SimpleNamespace(run_training_wizard=wizard))
    assert app_main(["--popup", "--alpha", "2"]) == 0
    assert seen["defaults"].alpha == 2.0  # flags reach the wizard as its defaults
    saved = os.listdir(tmp_path / "js")
    assert json.load(open(tmp_path / "js" / saved[0]))["net_dim"] == 4

    monkeypatch.setitem(sys.modules, "popups", types.SimpleNamespace(run_training_wizard=lambda defaults: None))
    assert app_main(["--popup"]) == 1
    assert "cancelled" in capsys.readouterr().out

    monkeypatch.setitem(sys.modules, "popups", types.SimpleNamespace())
    assert app_main(["--popup"]) == 2
    assert "--popup: the guided wizard is not available" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ launchers
def _link_with_spaces(tmp_path) -> str:
    folder = tmp_path / "a folder with spaces"
    folder.mkdir()
    link = folder / "LoRA Easy (copy)"
    os.symlink(ROOT, link)
    return str(link)


@pytest.mark.skipif(os.name == "nt", reason="bash launchers")
def test_sh_launchers_work_from_anywhere_and_with_spaces(tmp_path):
    repo = _link_with_spaces(tmp_path)
    elsewhere = tmp_path / "somewhere else"
    elsewhere.mkdir()
    out = subprocess.run(["bash", os.path.join(repo, "run_command_line.sh"), "-h"], cwd=elsewhere,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--net_dim" in out.stdout, out.stderr
    # relative paths given to the launcher are relative to where it was started
    (elsewhere / "data" / "3_x").mkdir(parents=True)
    (elsewhere / "job.json").write_text(json.dumps({"img_folder": "data", "base_model": "org/model",
                                                    "output_folder": "out"}), encoding="utf-8")
    out = subprocess.run(["bash", os.path.join(repo, "run_command_line.sh"), "--load_json_path", "job.json",
                          "--save_json_path", "saved", "--save_json_only"], cwd=elsewhere, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    saved = os.listdir(elsewhere / "saved")
    assert json.load(open(elsewhere / "saved" / saved[0]))["img_folder"] == str(elsewhere / "data")
    assert "--popup" in open(os.path.join(ROOT, "run_popup.sh")).read()
    for tool in TOOLS:
        script = os.path.join(ROOT, "scripts", f"{tool}.py")
        if not os.path.isfile(script):
            continue
        out = subprocess.run(["bash", os.path.join(repo, f"{tool}.sh"), "--help"], cwd=elsewhere,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (tool, out.stderr[-500:])


def test_every_launcher_exists():
    for name in ("install", "run_popup", "run_command_line", "update", *TOOLS):
        for ext in (".bat", ".sh"):
            assert os.path.isfile(os.path.join(ROOT, name + ext)), name + ext
            if ext == ".sh":
                assert os.access(os.path.join(ROOT, name + ext), os.X_OK), name + ext


@pytest.mark.parametrize("name", ["install", "run_popup", "run_command_line", "update", *TOOLS])
def test_bat_launchers_use_their_own_folder_and_quote_paths(name):
    raw = open(os.path.join(ROOT, f"{name}.bat"), "rb").read()
    assert raw.count(b"\r\n") == raw.count(b"\n")  # CRLF throughout: cmd.exe misreads LF-only labels
    text = raw.decode("ascii")
    assert "%~dp0" in text
    for line in text.splitlines():
        if line.lstrip().lower().startswith("rem"):
            continue
        for var in ("%HERE%", "%PY%", "%VPY%"):
            start = 0
            while (index := line.find(var, start)) >= 0:
                assert line[:index].count('"') % 2 == 1, f"unquoted {var} in {name}.bat: {line}"
                start = index + len(var)
    if name in TOOLS:
        assert f"scripts\\{name}.py" in text and "--popup" in text


def test_popup_with_a_json_file_loads_it_without_questions(tmp_path, monkeypatch):
    from frontend.app import run_main as app_main

    def wizard(defaults):
        raise AssertionError("no questions when a JSON file is given")

    monkeypatch.setitem(sys.modules, "popups", types.SimpleNamespace(run_training_wizard=wizard))
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"base_model": "org/model", "img_folder": str(_dataset(tmp_path)),
                               "output_folder": str(tmp_path / "out")}), encoding="utf-8")
    assert app_main(["--popup", "--load_json_path", str(job), "--save_json_path", str(tmp_path / "js"),
                     "--save_json_only"]) == 0
    assert len(os.listdir(tmp_path / "js")) == 1


def test_engine_errors_also_name_the_argslist_setting(capsys):
    from frontend.app import print_user_error
    from sd_scripts.core.errors import ConfigError, DatasetError, UserErrors

    print_user_error(UserErrors([DatasetError("train_data_dir: no images in /x", "train_data_dir"),
                                 ConfigError("clip_skip: must be between 1 and 12, got 20", "clip_skip")]))
    assert capsys.readouterr().err.splitlines() == [
        "error: train_data_dir: no images in /x (in ArgsList.py and JSON files: img_folder)",
        "error: clip_skip: must be between 1 and 12, got 20",
    ]
