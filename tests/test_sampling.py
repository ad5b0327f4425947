"""Sample images during training: kohya's prompt syntax and files, every sampler, names, grids, no effect on training."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import make_dataset, tiny_config

HAS_SCIPY = importlib.util.find_spec("scipy") is not None


# ------------------------------------------------------------------------------------------- prompt syntax


def test_prompt_line_options():
    from sd_scripts.training.sampling import parse_prompt_line

    sp = parse_prompt_line("1girl, solo --n lowres, bad hands --w 515 --h 700 --d 42 --l 5.5 --s 2000 --ss Euler_A")
    assert sp.prompt == "1girl, solo" and sp.negative_prompt == "lowres, bad hands"
    assert (sp.width, sp.height) == (512, 696), "sides are floored to multiples of 8"
    assert sp.seed == 42 and sp.scale == 5.5 and sp.sample_steps == 1000 and sp.sampler == "euler_a"
    sp = parse_prompt_line("just text")
    assert (sp.width, sp.height, sp.seed, sp.scale, sp.sample_steps, sp.sampler) == (512, 512, None, 7.5, 30, None)
    assert parse_prompt_line("tiny --w 8 --h 30").width == 64


@pytest.mark.parametrize(
    "line, needle",
    [
        ("a cat --x 3", "unknown option --x"),
        ("a cat --w wide", "--w has the bad value 'wide'"),
        ("a cat --s 0", "--s has the bad value"),
        ("a cat --d", "--d has no value"),
        ("a cat --ss nosuch", "--ss 'nosuch' is not a sampler"),
        ("a cat --cn hint.png", "--cn is a kohya option for other model families"),
        ("--w 512", "prompt text is empty"),
    ],
)
def test_bad_prompt_line_is_one_config_error(line, needle):
    from sd_scripts.core.errors import ConfigError
    from sd_scripts.training.sampling import parse_prompt_line

    with pytest.raises(ConfigError) as err:
        parse_prompt_line(line, "sample_prompts line 3")
    assert str(err.value).startswith("sample_prompts line 3: ") and needle in str(err.value)
    assert "\n" not in str(err.value)


def test_prompt_files_txt_json_toml(tmp_path):
    from sd_scripts.training.sampling import load_sample_prompts

    txt = tmp_path / "p.txt"
    txt.write_text("\ufeff# a comment\n\nfirst --w 64\n  # indented comment\nsecond --ss k_euler\n", encoding="utf-8")
    assert [(p.prompt, p.width, p.sampler) for p in load_sample_prompts(str(txt))] == [("first", 64, None),
                                                                                      ("second", 512, "k_euler")]
    js = tmp_path / "p.json"
    js.write_text('["one --h 128", {"prompt": "two", "width": 96, "seed": 3, "sample_sampler": "dpmsolver++"}]')
    got = load_sample_prompts(str(js))
    assert (got[0].prompt, got[0].height) == ("one", 128)
    assert (got[1].prompt, got[1].width, got[1].seed, got[1].sampler) == ("two", 96, 3, "dpmsolver++")
    toml = tmp_path / "p.toml"
    toml.write_text('[prompt]\nwidth = 64\nheight = 64\nsample_steps = 4\nnegative_prompt = "blurry"\n\n'
                    '[[prompt.subset]]\nprompt = "alpha"\n\n[[prompt.subset]]\nprompt = "beta"\nwidth = 128\nseed = 9\n')
    got = load_sample_prompts(str(toml))
    assert [(p.prompt, p.width, p.height, p.sample_steps, p.negative_prompt, p.seed) for p in got] == [
        ("alpha", 64, 64, 4, "blurry", None), ("beta", 128, 64, 4, "blurry", 9)]


@pytest.mark.parametrize(
    "name, text, needle",
    [
        ("p.json", '{"prompt": "x"}', "must hold a JSON list"),
        ("p.json", '[{"prompt": "x", "widht": 5}]', "unknown key 'widht'"),
        ("p.json", "[3]", "item 1: must be a prompt string"),
        ("p.json", '["x --w"]', "sample_prompts item 1: --w has no value"),
        ("p.toml", "prompt = 3", "no [prompt] table"),
        ("p.toml", "[prompt]\n[[prompt.subset]]\nwidth = 64\n", "no prompt text"),
        ("p.txt", "ok\nbad --q 1\n", "sample_prompts line 2: unknown option --q"),
    ],
)
def test_bad_prompt_files(tmp_path, name, text, needle):
    from sd_scripts.core.errors import ConfigError
    from sd_scripts.training.sampling import load_sample_prompts

    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_sample_prompts(str(path))
    assert needle in str(err.value)


def test_every_kohya_sampler_name_is_known():
    from sd_scripts.training.sampling import SAMPLERS

    kohya = ["ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
             "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"]
    assert sorted(SAMPLERS) == sorted(kohya)


@pytest.mark.skipif(HAS_SCIPY, reason="scipy is installed, lms works")
def test_lms_without_scipy_is_a_clear_error():
    from sd_scripts.core.config import TrainConfig
    from sd_scripts.core.errors import ConfigError
    from sd_scripts.training.sampling import check_sampling_settings, parse_prompt_line

    with pytest.raises(ConfigError, match="k_lms needs the scipy package"):
        parse_prompt_line("x --ss k_lms")
    errors = check_sampling_settings(TrainConfig(sample_prompts="p.txt", sample_sampler="lms"))
    assert len(errors) == 1 and "sample_sampler: lms needs the scipy package" in str(errors[0])


# ------------------------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("sampling") / "data", folder="1_sks shape", count=4)


def test_every_sampler_draws_with_its_size_and_kohya_names(tiny_sd1_diffusers, data, tmp_path):
    from PIL import Image

    from sd_scripts.models.loading import load_model
    from sd_scripts.training.sampling import SAMPLERS, generate_samples, parse_prompt_line, sampler_problem

    names = [n for n in SAMPLERS if sampler_problem(n) is None]
    model = load_model(tiny_config(tiny_sd1_diffusers, data, tmp_path))
    prompts = [parse_prompt_line(f"sks shape --ss {n} --w {64 + 8 * (i % 3)} --h 64 --s 2" + (" --d 5" if i % 2 else ""))
               for i, n in enumerate(names)]
    paths = generate_samples(model, prompts, out_dir=str(tmp_path / "sample"), output_name="tiny", label="000010",
                             default_sampler="ddim", v_parameterization=False, clip_skip=2, device="cpu")
    assert len(paths) == len(names) + 1
    for i, path in enumerate(paths[:-1]):
        name = os.path.basename(path)
        pattern = rf"tiny_000010_{i:02d}_\d{{14}}" + ("_5" if i % 2 else "") + r"\.png"
        assert re.fullmatch(pattern, name), name
        with Image.open(path) as im:
            assert im.size == (64 + 8 * (i % 3), 64)
            assert len(set(im.getdata())) > 1, f"{names[i]} drew a flat image"
    assert re.fullmatch(r"tiny_000010_grid_\d{14}\.png", os.path.basename(paths[-1]))
    with Image.open(paths[-1]) as grid:
        assert grid.size == (4 * 80, 4 * 64 + 20)  # rows of 4 cells of the largest size, under a header line


@pytest.mark.slow
def test_sampling_does_not_change_training(tiny_sd1_diffusers, data, tmp_path):
    """sample_at_first, every step and every epoch: the LoRA is bit-identical to a run that never sampled."""
    from sd_scripts.training.loop import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks shape, red --w 64 --h 64 --s 2\nsks shape --n blurry --w 64 --h 64 --s 2 --ss euler_a\n",
                       encoding="utf-8")
    base = dict(max_train_steps=4, network_dropout=0.1)
    plain = train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "plain", **base))
    sampled = train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "sampled", sample_prompts=str(prompts),
                                sample_at_first=True, sample_every_n_steps=1, **base))
    a, b = load_file(plain.output_path), load_file(sampled.output_path)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    names = sorted(os.listdir(tmp_path / "sampled" / "sample"))
    labels = sorted({n.split("_")[1] for n in names})
    assert labels == ["000000", "000001", "000002", "000003", "000004"]
    assert sum("_grid_" in n for n in names) == 5, "one grid per sampling point"
    assert len(sampled.sample_files) == 15
    # every_n_epochs takes precedence over every_n_steps (kohya); the last epoch is sampled once at the end
    by_epoch = train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "epochs", sample_prompts=str(prompts),
                                 sample_every_n_epochs=1, sample_every_n_steps=1, **base))
    labels = sorted({n.split("_")[1] for n in os.listdir(tmp_path / "epochs" / "sample")})
    assert labels == ["e000001", "e000002"]
    b = load_file(by_epoch.output_path)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_bad_prompt_file_stops_before_the_model_loads(tiny_sd1_diffusers, data, tmp_path, monkeypatch):
    from sd_scripts.models import loading as model_loading
    from sd_scripts.core.errors import UserError
    from sd_scripts.training.loop import train

    monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("good --w 64\nbad --steps 3\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "out", sample_prompts=str(prompts), sample_every_n_steps=1))
    assert "sample_prompts line 2: unknown option --steps" in str(err.value)
    assert not (tmp_path / "out").exists()
