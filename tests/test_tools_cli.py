"""The side tools' command lines, run as real subprocesses: examples, queues and every bad input
(one line on stderr, exit code 2, nothing written)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sd_scripts.files.lora_file import load_lora_file, save_lora_file
from tests import lora_synth as ls

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
TOOLS = ("lora_resize", "lora_merge", "locon_extract", "locon_loha_merge", "image_resize", "edit_tags", "dataset_report",
         "tag_images", "caption_images")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _start(tool, *args, cwd=None):
    cmd = [sys.executable, str(SCRIPTS / f"{tool}.py"), *[str(a) for a in args]]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=cwd or ROOT)


def _finish(proc):
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tools")
    f = {"dir": d}
    f["lora"] = d / "style.safetensors"
    save_lora_file(f["lora"], ls.mixed_lora(seed=1, r=32, conv_r=8, alpha=16.0, conv_alpha=8.0), {"ss_network_dim": "32"})
    f["lora_small"] = d / "small.safetensors"
    save_lora_file(f["lora_small"], ls.mixed_lora(seed=2, r=4, conv_r=2), {})
    base, _ = ls.ldm_checkpoint("sd1", seed=3)
    f["base"] = d / "base.safetensors"
    save_file(base, str(f["base"]))
    truth = ls.lora_for_checkpoint(base, rank=3, conv_rank=2, seed=4, scale=0.1)
    f["ckpt_lora"] = d / "ckpt_lora.safetensors"
    save_lora_file(f["ckpt_lora"], truth, {})
    tuned = {k: v.clone() for k, v in base.items()}
    from sd_scripts.networks.lycoris_merge import NetworkInput, merge_into_checkpoint
    from sd_scripts.networks.network_state import parse_network

    merge_into_checkpoint(tuned, [NetworkInput("t", parse_network(truth), 1.0)])
    f["tuned"] = d / "tuned.safetensors"
    save_file(tuned, str(f["tuned"]))
    other = dict(tuned)
    other["model.diffusion_model.input_blocks.1.1.proj_in.weight"] = torch.zeros(16, 32, 1, 1)
    f["other_shape"] = d / "other_shape.safetensors"
    save_file(other, str(f["other_shape"]))
    f["loha"] = d / "loha.safetensors"
    save_lora_file(f["loha"], ls.loha("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", 64, 64, 4), {})
    f["mystery"] = d / "mystery.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.mystery": torch.zeros(3)}, str(f["mystery"]))
    f["exists"] = d / "exists.safetensors"
    f["exists"].write_bytes(b"keep me")
    imgs = d / "imgs" / "5_cat"
    imgs.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (700, 500), (10, 200, 30)).save(imgs / "a.jpg")
    (imgs / "a.txt").write_text("cat", encoding="utf-8")
    f["imgs"] = d / "imgs"
    return f


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

BAD = {
    "resize_missing_file": ("lora_resize", ["--model", "{dir}/nope.safetensors", "--save_to", "{out}", "--new_rank", "4"], "does not exist"),
    "resize_not_a_lora": ("lora_resize", ["--model", "{base}", "--save_to", "{out}", "--new_rank", "4"], "not a kohya LoRA"),
    "resize_unknown_layout": ("lora_resize", ["--model", "{mystery}", "--save_to", "{out}", "--new_rank", "4"], "unknown key layout"),
    "resize_rank_zero": ("lora_resize", ["--model", "{lora}", "--save_to", "{out}", "--new_rank", "0"], "new_rank"),
    "resize_rank_negative": ("lora_resize", ["--model", "{lora}", "--save_to", "{out}", "--new_rank", "-3"], "new_rank"),
    "resize_rank_above": ("lora_resize", ["--model", "{lora_small}", "--save_to", "{out}", "--new_rank", "16"], "above"),
    "resize_output_exists": ("lora_resize", ["--model", "{lora}", "--save_to", "{exists}", "--new_rank", "4"], "--overwrite"),
    "resize_bad_param": ("lora_resize", ["--model", "{lora}", "--save_to", "{out}", "--new_rank", "8",
                                         "--dynamic_method", "sv_fro", "--dynamic_param", "1.5"], "dynamic_param"),
    "resize_not_a_number": ("lora_resize", ["--model", "{lora}", "--save_to", "{out}", "--new_rank", "x"], "invalid int"),
    "merge_count_mismatch": ("lora_merge", ["--models", "{lora}", "{lora_small}", "--ratios", "1", "--save_to", "{out}",
                                            "--new_rank", "4"], "ratios"),
    "merge_missing_file": ("lora_merge", ["--models", "{lora}", "{dir}/nope.safetensors", "--save_to", "{out}", "--concat"],
                           "does not exist"),
    "merge_not_a_lora": ("lora_merge", ["--models", "{lora}", "{base}", "--save_to", "{out}", "--concat"], "not a kohya LoRA"),
    "merge_rank_zero": ("lora_merge", ["--models", "{lora}", "{lora_small}", "--save_to", "{out}", "--new_rank", "0"], "new_rank"),
    "merge_output_exists": ("lora_merge", ["--models", "{lora}", "--save_to", "{exists}", "--concat"], "--overwrite"),
    "merge_ckpt_no_match": ("lora_merge", ["--sd_model", "{base}", "--models", "{lora_small}", "--save_to", "{out}"],
                            "shaped"),
    "extract_other_shapes": ("locon_extract", ["--base", "{base}", "--tuned", "{other_shape}", "--save_to", "{out}",
                                               "--linear_param", "4"], "different shapes"),
    "extract_missing_file": ("locon_extract", ["--base", "{base}", "--tuned", "{dir}/nope.safetensors", "--save_to", "{out}",
                                               "--linear_param", "4"], "does not exist"),
    "extract_rank_zero": ("locon_extract", ["--base", "{base}", "--tuned", "{tuned}", "--save_to", "{out}",
                                            "--linear_dim", "0"], "linear_param"),
    "extract_output_exists": ("locon_extract", ["--base", "{base}", "--tuned", "{tuned}", "--save_to", "{exists}",
                                                "--linear_param", "4"], "--overwrite"),
    "extract_lora_as_ckpt": ("locon_extract", ["--base", "{lora}", "--tuned", "{tuned}", "--save_to", "{out}",
                                               "--linear_param", "4"], "not an SD1/SD2"),
    "lyco_not_a_lora": ("locon_loha_merge", ["--base", "{base}", "--lycoris", "{base}", "--save_to", "{out}"], "not a kohya"),
    "lyco_unknown_layout": ("locon_loha_merge", ["--base", "{base}", "--lycoris", "{mystery}", "--save_to", "{out}"], "unknown key"),
    "lyco_missing_file": ("locon_loha_merge", ["--base", "{dir}/nope.ckpt", "--lycoris", "{loha}", "--save_to", "{out}"],
                          "does not exist"),
    "lyco_output_exists": ("locon_loha_merge", ["--base", "{base}", "--lycoris", "{loha}", "--save_to", "{exists}"], "--overwrite"),
    "images_missing_src": ("image_resize", ["--src", "{dir}/nope", "--dst", "{outdir}", "--sizes", "512"], "src"),
    "images_bad_size": ("image_resize", ["--src", "{imgs}", "--dst", "{outdir}", "--sizes", "0"], "sizes"),
    "images_dst_inside_src": ("image_resize", ["--src", "{imgs}", "--dst", "{imgs}/small", "--sizes", "256"], "overlap"),
}


@pytest.fixture(scope="module")
def bad_results(files):
    """Run every bad-input case concurrently (each in its own output folder)."""
    procs = {}
    for case, (tool, args, _) in BAD.items():
        case_dir = files["dir"] / "bad" / case
        case_dir.mkdir(parents=True)
        values = {k: str(v) for k, v in files.items()}
        values.update(out=str(case_dir / "out.safetensors"), outdir=str(case_dir / "out"))
        procs[case] = (_start(tool, *[a.format(**values) for a in args]), case_dir)
    return {case: (_finish(proc), case_dir) for case, (proc, case_dir) in procs.items()}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(bad_results, files, case):
    (rc, out, err), case_dir = bad_results[case]
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (case, out, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert BAD[case][2] in lines[0], lines[0]
    assert list(case_dir.iterdir()) == []
    assert files["exists"].read_bytes() == b"keep me"
    assert not (files["imgs"] / "small").exists()


# ---------------------------------------------------------------- examples and queues


@pytest.fixture(scope="module")
def good_results(files):
    d = files["dir"] / "good"
    d.mkdir()
    runs = {
        "resize_fixed_queue": _start("lora_resize", "--model", files["lora"], "--save_to", str(d / "fixed") + os.sep,
                                     "--queue", ROOT / "examples" / "resize_queue_fixed.txt"),
        "resize_dynamic_queue": _start("lora_resize", "--model", files["lora"], "--save_to", d / "dyn" / "x.safetensors",
                                       "--dynamic_method", "sv_fro", "--queue", ROOT / "examples" / "resize_queue_dynamic.txt",
                                       "--verbose"),
        "resize_list_one_fails": _start("lora_resize", "--model", files["lora_small"], "--save_to", str(d / "list") + os.sep,
                                        "--new_rank", "2", "16", "3"),
        "extract_queue": _start("locon_extract", "--base", files["base"], "--tuned", files["tuned"], "--save_to", str(d / "ex") + os.sep,
                                "--mode", "fixed", "--queue", ROOT / "examples" / "extract_queue.txt", "--verbose"),
        "merge_concat": _start("lora_merge", "--models", files["lora"], files["lora_small"], "--ratios", "0.5", "-1.25",
                               "--save_to", d / "concat.safetensors", "--concat"),
        "merge_ckpt": _start("lora_merge", "--sd_model", files["base"], "--models", files["ckpt_lora"], files["loha"],
                             "--ratios", "1", "-0.5", "--save_to", d / "merged_model.safetensors"),
        "lyco_merge": _start("locon_loha_merge", "--base", files["base"], "--lycoris", files["loha"], "--save_to",
                             d / "lyco_model.ckpt", "--weight", "0.7", "--dtype", "fp16"),
        "images": _start("image_resize", "--src", files["imgs"], "--dst", d / "imgs", "--sizes", "512", "256"),
    }
    return d, {name: _finish(p) for name, p in runs.items()}


def test_resize_queues_from_examples(good_results):
    d, res = good_results
    rc, out, err = res["resize_fixed_queue"]
    assert rc == 0, err
    assert sorted(p.name for p in (d / "fixed").iterdir()) == ["style-fixed-16.safetensors", "style-fixed-32.safetensors",
                                                               "style-fixed-8.safetensors"]
    sd, md = load_lora_file(d / "fixed" / "style-fixed-8.safetensors")
    assert md["ss_network_dim"] == "8"
    rc, out, err = res["resize_dynamic_queue"]
    assert rc == 0, err
    assert {p.name for p in (d / "dyn").iterdir()} == {"x-sv_fro-0.9-64.safetensors", "x-sv_fro-0.95-64.safetensors",
                                                        "x-sv_fro-0.99-128.safetensors"}
    assert "Average Frobenius norm retention" in out and "fro retained" in out
    rc, out, err = res["resize_list_one_fails"]
    assert rc == 2
    assert {p.name for p in (d / "list").iterdir()} == {"small-fixed-2.safetensors", "small-fixed-3.safetensors"}
    assert "skipped rank 16" in err and "above" in err


def test_extract_queue_from_example(good_results):
    d, res = good_results
    rc, out, err = res["extract_queue"]
    assert rc == 0, err
    names = {p.name for p in (d / "ex").iterdir()}
    assert names == {"tuned-fixed-64-32.safetensors", "tuned-fixed-32-16.safetensors", "tuned-fixed-16-0.safetensors"}
    sd, md = load_lora_file(d / "ex" / "tuned-fixed-16-0.safetensors")
    assert not any(v.dim() == 4 and v.shape[-1] == 3 for v in sd.values())  # conv 0: no 3x3 modules
    assert "relative error" in out


def test_merge_tools(good_results, files):
    from safetensors import safe_open

    d, res = good_results
    for name in ("merge_concat", "merge_ckpt", "lyco_merge", "images"):
        rc, out, err = res[name]
        assert rc == 0, (name, err)
    sd, md = load_lora_file(d / "concat.safetensors")
    assert md["ss_network_dim"] == "36"
    with safe_open(str(d / "merged_model.safetensors"), "pt") as f, safe_open(str(files["base"]), "pt") as g:
        assert set(f.keys()) == set(g.keys())
    state = torch.load(d / "lyco_model.ckpt", weights_only=True)["state_dict"]
    assert state["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert (d / "imgs" / "512" / "5_cat" / "a.png").exists() and (d / "imgs" / "256" / "5_cat" / "a.txt").exists()


def test_help_is_fast_and_does_not_import_torch():
    code = (
        "import runpy, sys\n"
        f"for tool in {TOOLS!r}:\n"
        "    sys.argv = [tool, '-h']\n"
        "    try:\n"
        f"        runpy.run_path(r'{SCRIPTS}/' + tool + '.py', run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (tool, e.code)\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("NO_TORCH")
    for flag in ("--new_rank", "--concat", "--linear_dim", "--weight", "--divisible_by", "--popup"):
        assert flag in res.stdout


def test_popup_without_a_display_says_so_in_one_line():
    env = {k: v for k, v in _env().items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}  # no window may open here
    procs = [subprocess.Popen([sys.executable, str(SCRIPTS / f"{tool}.py"), "--popup"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for tool in TOOLS]
    for tool, proc in zip(TOOLS, procs):
        rc, out, err = _finish(proc)
        assert rc == 2 and len(err.strip().splitlines()) == 1, (tool, err)
        assert "no display" in err or "isn't available yet" in err, (tool, err)
