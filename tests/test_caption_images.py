"""Natural-language captioning (sd_scripts/data/caption_model.py, image_captioning.py, scripts/caption_images.py)
with tiny random models of two architectures built in code: BLIP (image-to-text) and LLaVA (chat image-text-to-text),
loaded through the same path as a real model (a folder, or a repo id in the Hugging Face cache). No network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sd_scripts.core.errors import ModelLoadError
from sd_scripts.data import caption_model
from sd_scripts.data.caption_model import load_caption_model
from sd_scripts.data.image_captioning import CaptionText, append_caption, caption_text
from tests.helpers import load_tool, tree_digest
from tests.tiny_captioners import save_tiny_blip, save_tiny_florence2, save_tiny_llava

ROOT = Path(__file__).resolve().parents[1]


TOOL = load_tool("caption_images")


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("blip"), seed=1)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def florence2(tmp_path_factory):
    return save_tiny_florence2(tmp_path_factory.mktemp("florence2"))


@pytest.fixture()
def images(tmp_path):
    """``data/``: three pictures of different colours, one with a caption already, and a broken file."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name, size, colour in (("a.png", (48, 40), (200, 20, 20)), ("b.jpg", (40, 64), (20, 20, 200)),
                               ("c.png", (64, 64), (20, 200, 20))):
        img = Image.new("RGB", size, colour)
        img.paste((255, 255, 255), (8, 8, 24, 24))
        img.save(folder / name)
    (folder / "c.txt").write_text("mychar, old caption\nsecond line\n", encoding="utf-8")
    return folder


def _run(argv):
    return TOOL.cli.run(TOOL.main, [str(a) for a in argv])


# ------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("which, style", [("blip", "plain"), ("llava", "chat"), ("florence2", "task")])
def test_both_architectures_caption_a_batch_as_one_by_one(request, which, style):
    model = load_caption_model(str(request.getfixturevalue(which)), max_new_tokens=6)  # beam search, 3 wide
    assert model.style == style and model.device == "cpu"
    pictures = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (30, 50), (10, 10, 200)),
                Image.new("RGB", (64, 64), (10, 200, 10))]
    batch = model.caption(pictures)
    assert batch == [model.caption([p])[0] for p in pictures]
    assert all(isinstance(c, str) and c == " ".join(c.split()) for c in batch)
    assert any(batch)


def test_florence2_asks_its_detailed_caption_task_by_default(florence2):
    model = load_caption_model(str(florence2), max_new_tokens=4)
    assert model.style == "task" and model.prompt == "<DETAILED_CAPTION>"
    text = model.processor.batch_decode(model._inputs([Image.new("RGB", (32, 32))])["input_ids"])[0]
    assert "in detail what is shown in the image." in text  # the processor's question for the task


def test_chat_prompt_goes_through_the_models_chat_template(llava):
    model = load_caption_model(str(llava), prompt="describe this image .", max_new_tokens=4, num_beams=1)
    inputs = model._inputs([Image.new("RGB", (32, 32))])
    text = model.processor.batch_decode(inputs["input_ids"])[0]
    assert text.startswith("USER:") and "describe this image ." in text and text.rstrip().endswith("ASSISTANT:")
    assert model.processor.tokenizer.padding_side == "left"


def test_blip_drops_its_prompt_from_the_caption(blip):
    model = load_caption_model(str(blip), prompt="a photo of", max_new_tokens=5, num_beams=1)
    captions = model.caption([Image.new("RGB", (32, 32), (90, 90, 90))])
    assert not captions[0].lower().startswith("a photo of")


def test_a_repo_id_is_read_from_the_hugging_face_cache(llava, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    snapshot = tmp_path / "hub" / "models--someone--tiny-llava" / "snapshots" / ("0" * 40)
    shutil.copytree(llava, snapshot)
    (tmp_path / "hub" / "models--someone--tiny-llava" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-llava" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert caption_model.model_folder("someone/tiny-llava") == str(snapshot)
    assert load_caption_model("someone/tiny-llava", max_new_tokens=2, num_beams=1).style == "chat"
    with pytest.raises(ModelLoadError) as err:
        caption_model.model_folder("someone/not-downloaded")
    assert str(err.value).startswith("model: 'someone/not-downloaded' is not in the Hugging Face cache")
    assert "hf download someone/not-downloaded" in str(err.value)


def test_the_scripts_default_model_is_the_engines():
    assert TOOL.DEFAULT_MODEL == caption_model.DEFAULT_MODEL
    assert caption_model.DEFAULT_PROMPTS["task"] == "<DETAILED_CAPTION>"


# ------------------------------------------------------------------------------------------- the text
def test_caption_text_and_append_rules():
    text = CaptionText(trigger_words=("mychar", "sks"), prefix="photo of", suffix="high quality")
    assert caption_text("a woman", text) == "mychar, sks, photo of a woman high quality"
    assert caption_text("", CaptionText(trigger_words=("mychar",))) == "mychar"
    assert append_caption("mychar, red hair\r\nsecond\r\n", "a woman", text) == \
        "sks, mychar, red hair, photo of a woman high quality\r\nsecond\r\n"
    assert append_caption("\ufeffold", "new") == "\ufeffold, new\n"


# ------------------------------------------------------------------------------------------- the tool
def test_tool_writes_captions_beside_images_and_keeps_existing_ones(images, blip, capsys):
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    assert _run([images, "--model", blip, "--trigger_words", "mychar", "--suffix", "end.", "--num_beams", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 of 3 images already have a caption and are left alone" in out and "wrote 2 captions" in out
    for name in ("a", "b"):
        text = (images / f"{name}.txt").read_text(encoding="utf-8")
        assert text.startswith("mychar, ") and text.endswith(" end.\n") and text.count("\n") == 1
    assert (images / "c.txt").read_bytes() == before["c.txt"]  # never overwritten by default
    for name, data in before.items():  # the images are untouched
        assert (images / name).read_bytes() == data


def test_tool_append_overwrite_and_dry_run(images, llava, capsys):
    first = tree_digest(images)
    assert _run([images, "--model", llava, "--dry_run", "--overwrite", "--max_length", "4"]) == 0
    out = capsys.readouterr().out
    assert "would write 3 captions" in out and "(dry run: nothing written)" in out
    assert f"{images / 'c.txt'}: " in out
    assert tree_digest(images) == first

    assert _run([images, "--model", llava, "--append", "--trigger_words", "mychar, sks", "--caption_extension",
                 ".caption", "--max_length", "4"]) == 0
    assert tree_digest(images) != first and (images / "c.txt").read_text(encoding="utf-8").startswith("mychar, old")
    assert (images / "a.caption").read_text(encoding="utf-8").startswith("mychar, sks, ")

    old = (images / "c.txt").read_text(encoding="utf-8")
    assert _run([images, "--model", llava, "--append", "--trigger_words", "sks", "--max_length", "4"]) == 0
    appended = (images / "c.txt").read_text(encoding="utf-8")
    assert appended.startswith("sks, mychar, old caption, ") and appended.endswith("\nsecond line\n") and appended != old
    assert _run([images, "--model", llava, "--overwrite", "--max_length", "4"]) == 0
    assert "old caption" not in (images / "c.txt").read_text(encoding="utf-8")
    capsys.readouterr()


def test_tool_skips_unreadable_images_and_takes_a_queue(images, blip, tmp_path, capsys):
    (images / "broken.png").write_bytes(b"not an image")
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(other / "x.webp")
    queue = tmp_path / "queue.txt"
    queue.write_text("# folders\ndata\nother\n", encoding="utf-8")
    assert _run(["--queue", queue, "--model", blip, "--num_beams", "1", "--batch_size", "3"]) == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "wrote 3 captions; 1 images could not be read" in captured.out
    assert (other / "x.txt").is_file() and not (images / "broken.txt").exists()


def _architecture_folder(tmp_path, config):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.mark.parametrize("config, needle", [
    ({"model_type": "bert", "architectures": ["BertModel"]}, "is a bert model, which transformers does not load"),
    ({"model_type": "florence2", "auto_map": {"AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration"}},
     "needs its own Python code"),
])
def test_an_unsupported_architecture_is_one_line_and_exit_2(images, tmp_path, capsys, config, needle):
    before = tree_digest(images)
    assert _run([images, "--model", _architecture_folder(tmp_path, config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model: ") and needle in err and "\n" not in err
    assert "Florence-2" in err and tree_digest(images) == before


@pytest.mark.parametrize("argv, setting", [
    (["{t}/missing"], "train_data_dir"),
    (["{t}/empty"], "train_data_dir"),
    ([], "train_data_dir"),
    (["{t}/data", "--append", "--overwrite"], "append"),
    (["{t}/data", "--batch_size", "0"], "batch_size"),
    (["{t}/data", "--caption_extension", ".png"], "caption_extension"),
    (["{t}/data", "--model", "{t}/data/a.png"], "model"),
    (["{t}/data", "--model", "not a model"], "model"),
    (["{t}/data", "--model", "{t}/empty"], "model"),
    (["{t}/data", "--queue", "{t}/missing.txt"], "queue"),
])
def test_bad_input_is_one_line_and_exit_2_and_nothing_written(images, tmp_path, capsys, argv, setting):
    (tmp_path / "empty").mkdir()
    before = tree_digest(tmp_path)
    assert _run([a.format(t=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {setting}") and "\n" not in err, err
    assert tree_digest(tmp_path) == before


def test_a_model_not_in_the_cache_offline_is_one_line_as_a_process(images):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "caption_images.py"), str(images), "--model",
                          "nobody-here/no-such-captioner"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model: 'nobody-here/no-such-captioner' is not in the "
                                                   "Hugging Face cache and HF_HUB_OFFLINE is set")
    assert not list(images.glob("*.txt"))[1:]  # only c.txt, as before


# ------------------------------------------------------------------------------------------- the popup
def test_popup_builds_the_tools_arguments(images, monkeypatch):
    import popups._tool_flow as tool_flow
    from popups.asker import CANCEL, ScriptedAsker
    from popups.caption_images import MODELS, ask_arguments

    monkeypatch.setattr(tool_flow, "_cuda_available", lambda: False)
    asker = ScriptedAsker({"train_data_dir": str(images), "prompt": "<MORE_DETAILED_CAPTION>",
                           "trigger_words": "mychar", "existing": "append"})
    argv = ask_arguments(asker)
    assert argv == [str(images), "--model", MODELS[0], "--prompt", "<MORE_DETAILED_CAPTION>", "--trigger_words",
                    "mychar", "--append"]
    TOOL.build_parser().parse_args(argv)
    assert "1 of 3 images already have a caption" in asker.questions("existing")[0].prompt
    assert "python scripts/caption_images.py" in asker.questions("confirm")[0].details[1]
    for q in asker.asked:
        assert q.help and q.prompt and q.title == "Caption images", q.key

    asker = ScriptedAsker({"train_data_dir": str(images), "model": "other", "other_model": ["nope", "me/my-vlm"],
                           "prompt": "describe it", "dry_run": True})
    argv = ask_arguments(asker)
    assert argv == [str(images), "--model", "me/my-vlm", "--prompt", "describe it", "--dry_run"]
    assert asker.questions("other_model")[0].error is None and asker.questions("other_model")[1].error
    argv = ask_arguments(ScriptedAsker({"train_data_dir": str(images), "model": MODELS[2]}))
    assert argv == [str(images), "--model", MODELS[2]]  # BLIP: no prompt
    assert ask_arguments(ScriptedAsker({"train_data_dir": str(images), "model": CANCEL})) is None


def test_popup_runs_the_tool_with_a_model_folder(images, blip, monkeypatch, capsys):
    import popups
    import popups._tool_flow as tool_flow
    from popups.asker import ScriptedAsker

    monkeypatch.setattr(tool_flow, "_cuda_available", lambda: False)
    asker = ScriptedAsker({"train_data_dir": str(images), "model": "folder", "model_dir": [str(images), str(blip)],
                           "existing": "overwrite"})
    monkeypatch.setattr(popups, "open_asker", lambda *a, **k: asker)
    assert _run(["--popup"]) == 0
    assert asker.questions("model_dir")[1].error == "this folder has no config.json"
    assert "wrote 3 captions" in capsys.readouterr().out
    assert all((images / f"{n}.txt").is_file() for n in "abc")
