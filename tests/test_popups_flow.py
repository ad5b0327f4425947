"""The wizard's question flows, driven by a scripted asker (no screen): every branch of the training
wizard, the JSON it saves against the command line's, each side tool's popup, no-display runs."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ArgsList import ArgStore
from frontend.json_io import save_settings_json
from popups.asker import CANCEL, CLOSE, Question, ScriptedAsker, ask
from popups.gpu_memory import probe_gpu as PROBE_GPU
from popups.training_flow import TrainingWizard
from sd_scripts.core.settings import declared
from tests.helpers import make_dataset

ROOT = Path(__file__).resolve().parents[1]
INFOS = {info.name: info for info in ArgStore.settings()}
TOOLS = ("lora_resize", "lora_merge", "locon_extract", "locon_loha_merge", "image_resize", "edit_tags", "dataset_report",
         "tag_images", "caption_images")


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    """No GPU unless a test says otherwise: the GPU memory question then defaults to keeping the settings."""
    from popups import gpu_memory

    monkeypatch.setattr(gpu_memory, "probe_gpu", lambda: None)


@pytest.fixture
def paths(tmp_path):
    """A dataset (4 images x 5 repeats, captioned), a stand-in model file and an output folder."""
    data = make_dataset(tmp_path / "data")
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"not read by the wizard")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --n blurry\n", encoding="utf-8")
    return {"base_model": str(model), "img_folder": str(data), "output_folder": str(tmp_path / "out"),
            "prompts": str(prompts), "tmp": tmp_path}


def answers(paths, **more):
    out = {"base_model": paths["base_model"], "img_folder": paths["img_folder"], "output_folder": paths["output_folder"]}
    out.update(more)
    return out


def run_wizard(script, defaults=None):
    asker = ScriptedAsker(script)
    store = TrainingWizard(asker, defaults or ArgStore()).run()
    return store, asker


# ------------------------------------------------------------------------------------------ the order
def test_new_setup_asks_in_order_with_arglist_help_and_defaults(paths):
    store, asker = run_wizard(answers(paths))
    keys = asker.keys
    order = ["start", "save_json", "base_model", "model_type", "gpu_memory", "img_folder", "use_reg", "output_folder",
             "change_output_name", "clip_skip", "optimizer_type", "network_type", "net_dim", "alpha", "train_parts", "learning_rate",
             "unet_lr", "text_encoder_lr", "scheduler", "warmup_lr_ratio", "train_resolution", "height_resolution",
             "batch_size", "length_mode", "num_epochs", "save_every_n_epochs", "save_precision", "caption_extension",
             "shuffle_captions", "flip_aug", "mixed_precision", "cache_latents", "min_snr_gamma", "sample_images",
             "summary"]
    assert [k for k in keys if k in order] == order
    for q in asker.asked:  # every setting question explains itself with ArgsList's help line
        if q.key in INFOS:
            assert q.help == INFOS[q.key].help, q.key
            assert q.default_text(), q.key
    # closing every window (the default) changes nothing but the paths
    expected = ArgStore(base_model=paths["base_model"], img_folder=paths["img_folder"],
                        output_folder=paths["output_folder"])
    assert store == expected


def test_every_question_explains_itself(paths):
    _, asker = run_wizard(answers(paths, save_json=True, save_json_folder=str(paths["tmp"]), network_type="LoKr",
                                  scheduler="cosine_with_restarts", length_mode="steps", shuffle_captions=True,
                                  cache_latents=False, sample_images=True, sample_prompts=paths["prompts"],
                                  summary=["save", "start"], save_now_folder=str(paths["tmp"])))
    assert len(set(asker.keys)) > 45
    for q in asker.asked:
        assert q.help and q.prompt and q.title, q.key


def test_dataset_is_checked_as_soon_as_the_image_folder_is_chosen(paths):
    empty = paths["tmp"] / "empty"
    empty.mkdir()
    loose = paths["tmp"] / "loose"
    make_dataset(loose, folder=".", count=1)  # images directly inside, no <n>_<name> folder
    store, asker = run_wizard(answers(paths, img_folder=[str(empty), str(loose), str(paths["tmp"] / "nope"),
                                                         paths["img_folder"]]))
    errors = [q.error for q in asker.questions("img_folder")]
    assert errors[0] is None
    assert "is empty" in errors[1] and "<repeats>_<name>" in errors[1]
    assert "no <repeats>_<name> subfolders" in errors[2] and "move them into a subfolder" in errors[2]
    assert errors[3].startswith("folder not found")
    title, text, level = asker.told[0]
    assert title == "Dataset"
    assert "folder 5_sks shape: 4 images x 5 repeats, 4 with a caption file" in text
    assert "20 steps per epoch at batch size 1" in text
    assert level == "warning" and "blurry" in text  # 64 px images at 512
    assert store.img_folder == paths["img_folder"]


def test_the_dataset_is_scanned_again_only_when_its_folders_or_captions_change(paths):
    from popups.dataset_check import check_dataset

    scanned = []

    def scan(store, progress):
        scanned.append(store.caption_extension)
        return check_dataset(store, progress)

    script = answers(paths, batch_size=4, train_resolution=256, summary=["back", "start"],
                     img_folder=[paths["img_folder"]] * 2, caption_extension=[CLOSE, ".caption"])
    asker = ScriptedAsker(script)
    TrainingWizard(asker, ArgStore(), scan=scan).run()
    assert scanned == [".txt", ".caption"]
    assert [w[2].updates[-1] for w in asker.worked] == [(4, 4), (4, 4)]  # progress for every image
    assert "5 steps per epoch at batch size 4" in asker.questions("length_mode")[0].help  # 20 / 4, not rescanned
    assert "  folder 5_sks shape: 4 images x 5 repeats, 0 with a caption file" in asker.questions("summary")[1].details


def test_out_of_range_and_unreadable_answers_are_asked_again_with_the_reason(paths):
    store, asker = run_wizard(answers(
        paths, net_dim=[0, "abc", "2.5", "16"], alpha=[-1, "8"], train_resolution=[500, 32, 768],
        warmup_lr_ratio=[1, "0.05"], change_output_name=["my/lora", "my_lora"], clip_skip=[13, 1],
        learning_rate=[0, "3e-4"], min_snr_gamma=[0, ""], batch_size=["", 2]))
    def errors(key):
        return [q.error for q in asker.questions(key)][1:]

    assert errors("net_dim") == ["must be 1 or more, got 0", "expected a whole number, got 'abc'",
                                 "expected a whole number, got '2.5'"]
    assert errors("alpha") == ["must be above 0, got -1"]
    assert errors("train_resolution") == ["must be a multiple of 64, e.g. 512", "must be 64 or more, got 32"]
    # the declared range, in the command line's words (its open upper end too)
    assert errors("warmup_lr_ratio") == [declared("warmup_lr_ratio").range.problem(1)] and "below 1" in errors(
        "warmup_lr_ratio")[0]
    assert errors("change_output_name") == ["a file name cannot contain /"]
    assert errors("clip_skip") == ["must be from 1 to 12, got 13"]
    assert errors("learning_rate") == ["must be above 0, got 0"]
    assert errors("min_snr_gamma") == ["must be above 0, got 0"]
    assert errors("batch_size") == ["enter a number"]
    assert (store.net_dim, store.alpha, store.train_resolution, store.warmup_lr_ratio) == (16, 8.0, 768, 0.05)
    assert (store.change_output_name, store.clip_skip, store.learning_rate) == ("my_lora", 1, 3e-4)
    assert store.min_snr_gamma is None and store.batch_size == 2  # empty = off for an optional number


def test_closing_a_required_question_without_default_asks_again(paths):
    store, asker = run_wizard(answers(paths, base_model=[CLOSE, paths["base_model"]]))
    first, second = asker.questions("base_model")
    assert second.error == "choose a file (this one has no default)"
    assert store.base_model == paths["base_model"]


@pytest.mark.parametrize("key", ["start", "save_json", "base_model", "net_dim", "change_output_name", "optimizer_type",
                                 "summary"])
def test_cancel_at_each_kind_of_question_returns_none(paths, key):
    kinds = {"start": "choice", "save_json": "yes_no", "base_model": "path", "net_dim": "number",
             "change_output_name": "text", "optimizer_type": "choice", "summary": "summary"}
    store, asker = run_wizard(answers(paths, **{key: CANCEL}))
    assert store is None
    assert asker.asked[-1].key == key and asker.asked[-1].kind == kinds[key]


# ------------------------------------------------------------------------------------------ networks
def test_lora_is_the_plain_network(paths):
    defaults = ArgStore(network_args={"conv_dim": "4", "dropout": "0.1"}, lyco=False)  # a LoCon before
    store, asker = run_wizard(answers(paths, network_type="LoRA", net_dim=8, alpha=4), defaults)
    assert asker.questions("network_type")[0].default == "LoCon"
    assert (store.lyco, store.network_args, store.net_dim, store.alpha) == (False, {"dropout": "0.1"}, 8, 4.0)
    assert "conv_dim" not in asker.keys


def test_locon_is_kohya_locon_with_conv_dim_and_alpha(paths):
    store, asker = run_wizard(answers(paths, network_type="LoCon", net_dim=16, alpha=8, conv_dim=[0, 8], conv_alpha=4))
    assert asker.questions("conv_dim")[1].error == "must be 1 or more, got 0"
    assert store.lyco is False and store.network_args == {"conv_dim": "8", "conv_alpha": "4"}
    assert "use_tucker" not in asker.keys
    from frontend.settings_map import to_train_config

    config = to_train_config(store, has_cuda=False, has_xformers=False).config
    assert config.network_module == "networks.lora"
    assert config.network_args == ["conv_dim=8", "conv_alpha=4"]


@pytest.mark.parametrize("kind, tucker, extra, expected", [
    ("LoHa", True, {}, {"algo": "loha", "conv_dim": "4", "conv_alpha": "2", "use_tucker": "True"}),
    ("LoHa", False, {}, {"algo": "loha", "conv_dim": "4", "conv_alpha": "2"}),
    ("LoKr", False, {"factor": [0, 8]}, {"algo": "lokr", "conv_dim": "4", "conv_alpha": "2", "factor": "8"}),
])
def test_lycoris_algorithms_go_through_lyco_and_network_args(paths, kind, tucker, extra, expected):
    store, asker = run_wizard(answers(paths, network_type=kind, net_dim=8, alpha=4, conv_dim=4, conv_alpha=2,
                                      use_tucker=tucker, **extra))
    assert store.lyco is True and store.network_args == expected
    if "factor" in extra:
        assert asker.questions("factor")[1].error == "use -1 or a factor of 1 or more"
    from frontend.settings_map import to_train_config

    assert to_train_config(store, has_cuda=False, has_xformers=False).config.network_module == "lycoris.kohya"


def test_ia3_asks_no_rank_and_keeps_other_network_args(paths):
    defaults = ArgStore(lyco=True, network_args={"algo": "loha", "use_cp": "True", "conv_dim": "4", "preset": "full"})
    store, asker = run_wizard(answers(paths, network_type="IA3"), defaults)
    assert asker.questions("network_type")[0].default == "LoHa"
    assert not {"net_dim", "alpha", "conv_dim", "use_tucker"} & set(asker.keys)
    assert store.lyco is True and store.network_args == {"algo": "ia3", "preset": "full"}
    assert asker.questions("learning_rate")[0].default == 5e-3  # IA3 needs a much higher rate
    store, asker = run_wizard(answers(paths, network_type=["IA3", "LoHa"], summary=["back", "start"]))
    assert [q.default for q in asker.questions("learning_rate")] == [5e-3, 1e-4] and store.learning_rate == 1e-4
    assert store.network_args["algo"] == "loha" and "preset" not in store.network_args  # IA3's preset went with it
    store, _ = run_wizard(answers(paths, network_type="IA3"))
    assert store.network_args == {"algo": "ia3", "preset": "ia3"}


def test_old_tucker_names_give_the_default_of_the_tucker_question(paths):
    defaults = ArgStore(lyco=True, network_args={"algo": "loha", "disable_conv_cp": "False"})
    store, asker = run_wizard(answers(paths), defaults)
    assert asker.questions("use_tucker")[0].default is True  # disable_conv_cp=False means Tucker on
    assert store.network_args["use_tucker"] == "True" and "disable_conv_cp" not in store.network_args


def test_text_encoder_only_skips_the_unet_learning_rate(paths):
    store, asker = run_wizard(answers(paths, train_parts="text", text_encoder_lr="5e-5"))
    assert (store.unet_only, store.text_only, store.text_encoder_lr, store.unet_lr) == (False, True, 5e-5, None)
    assert "unet_lr" not in asker.keys


# ------------------------------------------------------------------------------------------ optimizers
def test_dadaptation_sets_decouple_and_a_learning_rate_near_one(paths):
    store, asker = run_wizard(answers(paths, optimizer_type="DAdaptation", summary=["back", "start"],
                                      img_folder=[paths["img_folder"]] * 2))
    first = asker.questions("learning_rate")[0]
    assert first.default == 1.0 and "about 1.0" in first.prompt
    assert store.optimizer_args == {"weight_decay": "0.1", "betas": "0.9,0.99", "decouple": "True"}
    assert store.learning_rate == 1.0 and store.unet_lr is None and store.text_encoder_lr is None
    assert "unet_lr" not in asker.keys and "text_encoder_lr" not in asker.keys
    # Back, then a plain optimizer: decouple goes, the learning rate default goes back to ArgsList's
    store, asker = run_wizard(answers(paths, optimizer_type=["DAdaptation", "AdamW"], summary=["back", "start"]))
    assert asker.questions("learning_rate")[1].default == INFOS["learning_rate"].default
    assert "decouple" not in store.optimizer_args and store.learning_rate == INFOS["learning_rate"].default


def test_scheduler_options_follow_the_scheduler(paths):
    store, asker = run_wizard(answers(paths, scheduler="cosine_with_restarts", cosine_restarts=[0, 3]))
    assert store.cosine_restarts == 3 and "scheduler_power" not in asker.keys
    store, asker = run_wizard(answers(paths, scheduler="polynomial", scheduler_power=2))
    assert store.scheduler_power == 2.0 and "cosine_restarts" not in asker.keys
    store, asker = run_wizard(answers(paths, scheduler="constant"), ArgStore(warmup_lr_ratio=0.1))
    assert store.warmup_lr_ratio is None and "warmup_lr_ratio" not in asker.keys


# ------------------------------------------------------------------------------------------ length
def test_epochs_with_steps_estimated_from_buckets_and_batch_size(paths):
    store, asker = run_wizard(answers(paths, batch_size=2, length_mode="epochs", num_epochs=3, save_every_n_epochs=1))
    assert "10 steps per epoch at batch size 2" in asker.questions("length_mode")[0].help
    assert (store.num_epochs, store.max_steps, store.save_every_n_epochs) == (3, None, 1)
    assert "save_every_n_steps" not in asker.keys
    details = asker.questions("summary")[0].details
    assert "Estimated steps: 30 (10 per epoch x 3 epochs)" in details


def test_steps_instead_of_epochs(paths):
    store, asker = run_wizard(answers(paths, length_mode="steps", max_steps=[0, 300], save_every_n_steps=100),
                              ArgStore(save_every_n_epochs=2))
    assert asker.questions("max_steps")[0].default == 20  # one epoch's worth
    assert (store.max_steps, store.save_every_n_steps, store.save_every_n_epochs) == (300, 100, None)
    assert "num_epochs" not in asker.keys and "save_every_n_epochs" not in asker.keys
    assert "Estimated steps: 300 (20 per epoch x 15 epochs)" in asker.questions("summary")[0].details


def test_non_square_resolution_and_same_height_means_square(paths):
    store, _ = run_wizard(answers(paths, train_resolution=512, height_resolution=768))
    assert (store.train_resolution, store.height_resolution) == (512, 768)
    store, _ = run_wizard(answers(paths, train_resolution=256, height_resolution=1024))
    assert (store.min_bucket_resolution, store.max_bucket_resolution) == (256, 1024)  # widened to hold them
    store, _ = run_wizard(answers(paths, train_resolution=512, height_resolution=512))
    assert store.height_resolution is None


# ------------------------------------------------------------------------------------------ samples, captions, caching
@pytest.mark.parametrize("when, number, field, other", [("epochs", 2, "sample_every_n_epochs", "sample_every_n_steps"),
                                                        ("steps", 50, "sample_every_n_steps", "sample_every_n_epochs")])
def test_sample_images(paths, when, number, field, other):
    store, asker = run_wizard(answers(paths, sample_images=True, sample_prompts=paths["prompts"],
                                      sample_sampler="euler_a", sample_when=when, **{field: number}))
    assert (store.sample_prompts, store.sample_sampler, getattr(store, field), getattr(store, other)) == \
        (paths["prompts"], "euler_a", number, None)
    # the saved JSON keeps it (the 2023 popup wrote sample_every_n_epoch and lost it on reload)
    saved = save_settings_json(store, str(paths["tmp"] / "js"))
    assert json.load(open(saved))[field] == number
    from frontend.resolve import resolve_settings

    assert getattr(resolve_settings({"load_json_path": saved}).store, field) == number


def test_no_samples_clears_them(paths):
    store, _ = run_wizard(answers(paths, sample_images=False),
                          ArgStore(sample_prompts=paths["prompts"], sample_every_n_steps=10, sample_at_first=True))
    assert (store.sample_prompts, store.sample_every_n_steps, store.sample_at_first) == (None, None, False)


def test_captions_and_caching_branches(paths):
    store, asker = run_wizard(answers(paths, shuffle_captions=True, keep_tokens=1, tag_order="alphabetically",
                                      cache_latents=False, random_crop=True, flip_aug=True, mixed_precision="bf16"))
    assert (store.shuffle_captions, store.keep_tokens, store.sort_tag_occurrence_alphabetically) == (True, 1, True)
    assert (store.cache_latents, store.random_crop, store.flip_aug, store.mixed_precision) == (False, True, True, "bf16")
    assert "cache_latents_to_disk" not in asker.keys
    store, asker = run_wizard(answers(paths, cache_latents=True, cache_latents_to_disk=True), ArgStore(random_crop=True))
    assert (store.cache_latents_to_disk, store.random_crop) == (True, False) and "random_crop" not in asker.keys


def test_sd2_v_parameterization(paths):
    store, asker = run_wizard(answers(paths, model_type="sd2", v_parameterization=True))
    assert store.v2 and store.v_parameterization and not store.sdxl
    store, asker = run_wizard(answers(paths, model_type="sd1"), ArgStore(v_parameterization=True))
    assert not store.v_parameterization and "v_parameterization" not in asker.keys


def test_regularization_folder(paths):
    reg = make_dataset(paths["tmp"] / "reg", folder="1_shape", count=2)
    store, _ = run_wizard(answers(paths, use_reg=True, reg_img_folder=str(reg)))
    assert store.reg_img_folder == str(reg)
    store, _ = run_wizard(answers(paths, use_reg=False), ArgStore(reg_img_folder=str(reg)))
    assert store.reg_img_folder is None


# ------------------------------------------------------------------------------------------ queue, JSON files
def test_queue_folder(paths):
    queue = paths["tmp"] / "queue"
    queue.mkdir()
    store, asker = run_wizard({"start": "queue", "multi_run_folder": [str(queue), str(paths["tmp"] / "missing"),
                                                                       str(queue)]})
    assert store is None  # the script ran out of good answers: closing gives no default, so it was cancelled
    (queue / "job.JSON").write_text("{}", encoding="utf-8")
    store, asker = run_wizard({"start": "queue", "multi_run_folder": [str(paths["tmp"]), str(queue)]})
    assert asker.questions("multi_run_folder")[1].error.startswith("no .json files in")
    assert store.multi_run_folder == str(queue)
    assert asker.keys == ["start", "multi_run_folder", "multi_run_folder"]


def test_a_queue_folder_from_the_command_line_is_the_default_and_can_be_declined(paths):
    queue = paths["tmp"] / "queue"
    queue.mkdir()
    (queue / "a.json").write_text("{}", encoding="utf-8")
    store, asker = run_wizard({"start": CLOSE}, ArgStore(multi_run_folder=str(queue)))
    assert asker.questions("start")[0].default == "queue" and store.multi_run_folder == str(queue)
    store, _ = run_wizard(answers(paths, start="new"), ArgStore(multi_run_folder=str(queue)))
    assert store.multi_run_folder is None  # main.py trains this setup instead of running the queue
    store, _ = run_wizard({"start": "load_json", "load_json_path": _saved_job(paths)},
                          ArgStore(multi_run_folder=str(queue)))
    assert store.multi_run_folder is None and store.net_dim == 8


def _saved_job(paths, **values):
    store = ArgStore(base_model=paths["base_model"], img_folder=paths["img_folder"],
                     output_folder=paths["output_folder"], net_dim=8, alpha=1, optimizer_type="Lion", **values)
    return save_settings_json(store, str(paths["tmp"] / "jobs"), "job")


def test_load_json_keeps_its_settings(paths):
    job = _saved_job(paths)
    broken = paths["tmp"] / "broken.json"
    broken.write_text("{net_dim: 4", encoding="utf-8")
    store, asker = run_wizard({"start": "load_json", "load_json_path": [str(broken), job], "reask_paths": False})
    assert "not valid JSON at line 1" in asker.questions("load_json_path")[1].error
    assert (store.net_dim, store.alpha, store.optimizer_type, store.load_json_path) == (8, 1.0, "Lion", job)
    assert asker.keys == ["start", "load_json_path", "load_json_path", "reask_paths", "save_json", "summary"]


def test_load_json_then_new_folders_and_name(paths):
    job = _saved_job(paths)
    other_data = make_dataset(paths["tmp"] / "data2", folder="3_other")
    other_model = paths["tmp"] / "other.ckpt"
    other_model.write_bytes(b"x")
    store, asker = run_wizard({"start": "load_json", "load_json_path": job, "reask_paths": True,
                               "base_model": str(other_model), "img_folder": str(other_data),
                               "output_folder": str(paths["tmp"] / "out2"), "change_output_name": "second"})
    assert (store.base_model, store.img_folder, store.output_folder, store.change_output_name) == \
        (str(other_model), str(other_data), str(paths["tmp"] / "out2"), "second")
    assert (store.net_dim, store.optimizer_type) == (8, "Lion")
    assert "net_dim" not in asker.keys  # the rest comes from the file...
    assert asker.questions("base_model")[0].default == paths["base_model"]  # ...and the file's paths are the defaults
    # Back from the summary walks through every question with the file's values as defaults
    store, asker = run_wizard({"start": "load_json", "load_json_path": job, "summary": ["back", "start"], "net_dim": 4})
    assert asker.questions("net_dim")[0].default == 8 and store.net_dim == 4


def test_save_json_questions(paths):
    store, asker = run_wizard(answers(paths, save_json=True, save_json_folder=str(paths["tmp"] / "js"),
                                      save_json_name=["a:b", "first"], save_json_only=True))
    assert asker.questions("save_json_folder")[0].default == ArgStore().output_folder  # None: no output folder yet
    assert asker.questions("save_json_name")[1].error == "a file name cannot contain :"
    assert (store.save_json_folder, store.save_json_name, store.save_json_only) == \
        (str(paths["tmp"] / "js"), "first", True)
    assert asker.questions("summary")[0].labels["start"] == "Save the JSON file (no training)"
    store, _ = run_wizard(answers(paths, save_json=False), ArgStore(save_json_folder="x", save_json_name="n"))
    assert (store.save_json_folder, store.save_json_name, store.save_json_only) == (None, None, False)


def test_summary_save_writes_the_json_and_stays(paths):
    folder = paths["tmp"] / "from_summary"
    store, asker = run_wizard(answers(paths, summary=["save", "start"], save_now_folder=str(folder),
                                      save_now_name="keep"))
    saved = list(folder.iterdir())
    assert len(saved) == 1 and saved[0].name.endswith("-keep.json")
    from frontend.json_io import saved_settings_dict

    assert json.loads(saved[0].read_text(encoding="utf-8")) == saved_settings_dict(store)
    assert asker.told[-1][0] == "Saved" and str(saved[0]) in asker.told[-1][1]


def test_summary_lists_choices_and_refuses_to_start_what_cannot_run(paths):
    store, asker = run_wizard(answers(paths, summary=["start", CANCEL]), ArgStore(resume_from_huggingface=True))
    assert store is None
    title, text, level = asker.told[-1]
    assert (title, level) == ("Cannot start", "error") and "resume_from_huggingface" in text
    details = asker.questions("summary")[0].details
    assert "Paths" in details and f"  base_model: {paths['base_model']}" in details
    assert "  optimizer_type: AdamW8bit" in details and "  cosine_restarts: 1" not in details  # cosine: no restarts


# ------------------------------------------------------------------------------------------ same JSON as the command line
def test_the_json_a_wizard_run_saves_equals_the_command_lines(paths, monkeypatch):
    import popups
    from frontend.app import run_main

    tmp = paths["tmp"]
    script = answers(paths, save_json=True, save_json_folder=str(tmp / "wizard"), save_json_name="same",
                     save_json_only=True, change_output_name="mylora", optimizer_type="AdamW", network_type="LoCon",
                     net_dim=16, alpha=8, conv_dim=8, conv_alpha=4, learning_rate="2e-4", unet_lr="3e-4",
                     scheduler="cosine_with_restarts", cosine_restarts=3, warmup_lr_ratio="0.05",
                     train_resolution=768, batch_size=2, num_epochs=4, save_every_n_epochs=2, shuffle_captions=True,
                     keep_tokens=1, min_snr_gamma=5, clip_skip=1, training_comment="made by the wizard")
    asker = ScriptedAsker(script)
    monkeypatch.setattr(popups, "open_asker", lambda *a, **k: asker)
    assert run_main(["--popup"]) == 0
    flags = ["--base_model", paths["base_model"], "--img_folder", paths["img_folder"],
             "--output_folder", paths["output_folder"], "--save_json_path", str(tmp / "cli"), "--save_json_name", "same",
             "--save_json_only", "--change_output_name", "mylora", "--optimizer_type", "AdamW",
             "--network_args", "conv_dim=8", "conv_alpha=4", "--net_dim", "16", "--alpha", "8",
             "--learning_rate", "2e-4", "--unet_lr", "3e-4", "--scheduler", "cosine_with_restarts",
             "--cosine_restarts", "3", "--warmup_lr_ratio", "0.05", "--train_resolution", "768", "--batch_size", "2",
             "--num_epochs", "4", "--save_every_n_epochs", "2", "--shuffle_captions", "--keep_tokens", "1",
             "--min_snr_gamma", "5", "--clip_skip", "1", "--training_comment", "made by the wizard"]
    assert run_main(flags) == 0
    (wizard_file,), (cli_file,) = list((tmp / "wizard").iterdir()), list((tmp / "cli").iterdir())
    wizard_json = json.loads(wizard_file.read_text(encoding="utf-8"))
    cli_json = json.loads(cli_file.read_text(encoding="utf-8"))
    assert wizard_json.pop("save_json_folder") == str(tmp / "wizard")
    assert cli_json.pop("save_json_folder") == str(tmp / "cli")
    assert wizard_json == cli_json


def test_main_popup_cancelled_trains_nothing(monkeypatch, capsys):
    import popups
    from frontend.app import run_main

    monkeypatch.setattr(popups, "open_asker", lambda *a, **k: ScriptedAsker({"start": CANCEL}))
    assert run_main(["--popup", "--net_dim", "4"]) == 1
    assert "cancelled" in capsys.readouterr().out


def test_command_line_flags_are_the_wizards_defaults(paths):
    import popups
    from frontend.cli import parse_command_line
    from frontend.resolve import resolve_settings

    given, _ = parse_command_line(["--net_dim", "12", "--optimizer_type", "Lion"])
    asker = ScriptedAsker(answers(paths))
    store = popups.run_training_wizard(resolve_settings(given).store, asker=asker)
    assert asker.questions("net_dim")[0].default == 12 and store.optimizer_type == "Lion"


# ------------------------------------------------------------------------------------------ no display, no torch
def _no_display_env():
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


@pytest.mark.skipif(os.name == "nt", reason="Windows always has a display")
def test_without_a_display_one_line_points_to_the_command_line(tmp_path):
    env = _no_display_env()
    procs = {"main": subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--popup"], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)}
    for tool in TOOLS:
        procs[tool] = subprocess.Popen([sys.executable, str(ROOT / "scripts" / f"{tool}.py"), "--popup"], cwd=tmp_path,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (name, out, err)
        assert len(lines) == 1 and "no display" in lines[0], (name, err)
        hint = "python main.py -h" if name == "main" else f"python scripts/{name}.py --help"
        assert hint in lines[0], (name, lines[0])


def test_the_wizard_imports_neither_torch_nor_diffusers(paths, xl_model):
    code = (
        "import sys\n"
        "from ArgsList import ArgStore\n"
        "from popups.asker import ScriptedAsker\n"
        "from popups.training_flow import TrainingWizard\n"
        f"asker = ScriptedAsker({answers(paths, base_model=xl_model)!r})\n"
        "store = TrainingWizard(asker, ArgStore()).run()\n"
        "assert store is not None and asker.keys[-1] == 'summary'\n"
        "assert store.sdxl and store.train_resolution == 1024  # the family was read from the header\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_no_display_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------ side tools
def _parser(tool):
    spec = importlib.util.spec_from_file_location(f"_test_popup_{tool}", ROOT / "scripts" / f"{tool}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tool(tool, script):
    module = importlib.import_module(f"popups.{tool}")
    asker = ScriptedAsker(script)
    argv = module.ask_arguments(asker)
    if argv is not None:
        _parser(tool).build_parser().parse_args(argv)  # every flag is one the tool knows
    return argv, asker


@pytest.fixture
def lora_files(tmp_path):
    files = {}
    for name in ("a", "b", "model"):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(b"x")
        files[name] = str(path)
    (tmp_path / "queue.txt").write_text("32\n16\n", encoding="utf-8")
    files["queue"] = str(tmp_path / "queue.txt")
    files["tmp"] = tmp_path
    return files


def test_lora_resize_single_fixed_rank(lora_files):
    argv, asker = _tool("lora_resize", {"model": lora_files["a"], "new_rank": [0, 16], "save_precision": "bf16"})
    out = str(lora_files["tmp"] / "a-fixed-16.safetensors")
    assert argv == ["--model", lora_files["a"], "--new_rank", "16", "--save_to", out, "--save_precision", "bf16",
                    "--device", "cpu"]
    assert asker.questions("new_rank")[1].error == "must be 1 or more, got 0"
    assert asker.questions("model")[0].help.startswith("LoRA file to resize")  # the flag's --help
    assert "python scripts/lora_resize.py --model" in asker.questions("confirm")[0].details[1]


def test_lora_resize_dynamic_lists_and_queue(lora_files):
    argv, asker = _tool("lora_resize", {"model": lora_files["a"], "dynamic_method": "sv_fro", "several": True,
                                        "dynamic_param": ["0.9 1.5", "0.9 0.5"], "new_rank": ["8 8 8", "64"],
                                        "save_folder": str(lora_files["tmp"] / "out"), "verbose": True})
    assert asker.questions("dynamic_param")[1].error == "1.5: must be above 0 to 1, got 1.5"
    assert asker.questions("new_rank")[1].error == "give 1 rank or 2 (one per value), not 3"
    assert argv[:10] == ["--model", lora_files["a"], "--dynamic_method", "sv_fro", "--dynamic_param", "0.9", "0.5",
                         "--new_rank", "64", "--save_to"]
    assert argv[10] == str(lora_files["tmp"] / "out") + os.sep and argv[-1] == "--verbose"
    argv, _ = _tool("lora_resize", {"model": lora_files["a"], "several": True, "values_from": "queue",
                                    "queue": lora_files["queue"], "save_folder": str(lora_files["tmp"])})
    assert argv[2:4] == ["--queue", lora_files["queue"]]
    assert "--overwrite" not in argv  # asked, since the folder has files; closing means no


def test_lora_merge_sliders_and_honest_device(lora_files, monkeypatch):
    import popups._tool_flow as tool_flow

    monkeypatch.setattr(tool_flow, "_cuda_available", lambda: False)
    argv, asker = _tool("lora_merge", {"models": [lora_files["a"], lora_files["a"], lora_files["b"]],
                                       "add_another": [True, False], "ratios": [[5, 1], [0.7, -0.5]],
                                       "new_rank": 8, "save_to": str(lora_files["tmp"] / "ab"),
                                       "device": ["cuda", "cpu"]})
    assert asker.questions("models")[2].error == "already chosen; pick another file"
    ratios = asker.questions("ratios")
    assert ratios[0].options == ("1. a.safetensors", "2. b.safetensors") and ratios[0].default == [1.0, 1.0]
    assert (ratios[0].low, ratios[0].high) == (-1.0, 4.0) and ratios[1].error == "must be from -1 to 4, got 5"
    assert asker.questions("device")[1].error == "no CUDA GPU is visible to PyTorch here; choose the CPU"
    assert argv == ["--models", lora_files["a"], lora_files["b"], "--ratios", "0.7", "-0.5", "--new_rank", "8",
                    "--save_to", str(lora_files["tmp"] / "ab.safetensors"), "--device", "cpu"]
    monkeypatch.setattr(tool_flow, "_cuda_available", lambda: True)
    argv, _ = _tool("lora_merge", {"into_model": True, "sd_model": lora_files["model"], "v2": True,
                                   "models": lora_files["a"], "save_to": lora_files["b"], "overwrite": [False, True],
                                   "device": "cuda", "save_precision": "fp16"})
    assert argv == ["--sd_model", lora_files["model"], "--v2", "--models", lora_files["a"], "--ratios", "1",
                    "--save_to", lora_files["b"], "--overwrite", "--save_precision", "fp16", "--device", "cuda"]


def test_lora_merge_concat(lora_files):
    argv, _ = _tool("lora_merge", {"models": [lora_files["a"], lora_files["b"]], "add_another": [True, False],
                                   "merge_method": "concat", "save_to": str(lora_files["tmp"] / "c.safetensors")})
    assert "--concat" in argv and "--new_rank" not in argv and argv[argv.index("--ratios") + 1:][:2] == ["1", "1"]


def test_locon_extract(lora_files):
    argv, asker = _tool("locon_extract", {"base": lora_files["model"], "tuned": [lora_files["model"], lora_files["a"]],
                                          "mode": "fixed", "linear_param": [2.5, 64], "conv_param": 16})
    assert asker.questions("tuned")[1].error == "this is the base checkpoint; choose the fine-tuned one"
    assert asker.questions("linear_param")[1].error == "expected a whole number, got '2.5'"
    assert argv == ["--base", lora_files["model"], "--tuned", lora_files["a"], "--mode", "fixed", "--linear_param", "64",
                    "--conv_param", "16", "--save_to", str(lora_files["tmp"] / "a-locon.safetensors"),
                    "--device", "cpu"]
    argv, asker = _tool("locon_extract", {"base": lora_files["model"], "tuned": lora_files["a"], "mode": "ratio",
                                          "several": True, "linear_param": ["0.5 1.5", "0.5 0.25"], "conv_param": "",
                                          "save_folder": str(lora_files["tmp"] / "x")})
    assert asker.questions("linear_param")[1].error == "1.5: must be above 0 to 1, got 1.5"
    assert "--conv_param" not in argv and argv[6:9] == ["--linear_param", "0.5", "0.25"]
    argv, _ = _tool("locon_extract", {"base": lora_files["model"], "tuned": lora_files["a"], "conv_param": ""})
    assert "--conv_param" not in argv and argv[-3].endswith("a-lora.safetensors")


def test_locon_loha_merge(lora_files):
    argv, _ = _tool("locon_loha_merge", {"base": lora_files["model"], "lycoris": lora_files["a"], "weight": "0.5",
                                         "dtype": "fp16", "save_to": str(lora_files["tmp"] / "merged.ckpt")})
    assert argv == ["--base", lora_files["model"], "--lycoris", lora_files["a"], "--weight", "0.5", "--dtype", "fp16",
                    "--save_to", str(lora_files["tmp"] / "merged.ckpt"), "--device", "cpu"]
    argv, asker = _tool("locon_loha_merge", {"base": lora_files["model"], "lycoris": lora_files["a"],
                                             "save_to": str(lora_files["tmp"] / "merged.txt")})
    assert argv is None  # a .txt output is refused and the script ran out of answers: cancelled
    assert "is not a .safetensors / .ckpt file" in asker.questions("save_to")[1].error


@pytest.mark.parametrize("tool, key", [("lora_resize", "model"), ("lora_merge", "ratios"), ("locon_extract", "mode"),
                                       ("locon_loha_merge", "dtype"), ("image_resize", "sizes")])
def test_cancel_in_a_tool_popup(lora_files, tool, key):
    script = {"model": lora_files["a"], "models": lora_files["a"], "base": lora_files["model"],
              "tuned": lora_files["a"], "lycoris": lora_files["a"], "src": str(lora_files["tmp"]), key: CANCEL}
    argv, asker = _tool(tool, script)
    assert argv is None and asker.asked[-1].key == key


def test_image_resize_popup_runs_the_tool(tmp_path, monkeypatch, capsys):
    import popups

    src = make_dataset(tmp_path / "data", folder="2_thing", count=2, size=(300, 200))
    script = {"src": str(src), "dst": [str(src / "inside"), str(tmp_path / "small")], "sizes": [[], CLOSE],
              "interpolation": "lanczos4"}
    asker = ScriptedAsker(script)
    monkeypatch.setattr(popups, "open_asker", lambda *a, **k: asker)
    tool = _parser("image_resize")
    assert tool.main(["--popup"]) == 0
    assert asker.questions("dst")[1].error == "the output folder must be outside the dataset folder"
    assert asker.questions("sizes")[1].error == "tick at least 1"
    written = sorted(p.relative_to(tmp_path / "small").as_posix() for p in (tmp_path / "small").rglob("*.png"))
    assert [w.split("/")[0] for w in written] == ["128", "128", "256", "256", "384", "384", "512", "512"]
    assert "wrote" in capsys.readouterr().out


def test_every_tool_question_explains_itself(lora_files, monkeypatch):
    import popups._tool_flow as tool_flow

    monkeypatch.setattr(tool_flow, "_cuda_available", lambda: True)
    scripts = [
        ("lora_resize", {"model": lora_files["a"], "dynamic_method": "sv_ratio", "several": True, "device": "cuda",
                         "save_folder": str(lora_files["tmp"])}),
        ("lora_resize", {"model": lora_files["a"], "several": True, "values_from": "queue",
                         "queue": lora_files["queue"], "save_folder": str(lora_files["tmp"] / "new")}),
        ("lora_merge", {"into_model": True, "sd_model": lora_files["model"], "models": [lora_files["a"], lora_files["b"]],
                        "add_another": [True, False], "save_to": lora_files["b"], "overwrite": True}),
        ("lora_merge", {"models": lora_files["a"], "save_to": str(lora_files["tmp"] / "m.safetensors")}),
        ("locon_extract", {"base": lora_files["model"], "tuned": lora_files["a"], "several": True,
                           "save_folder": str(lora_files["tmp"] / "x")}),
        ("locon_loha_merge", {"base": lora_files["model"], "lycoris": lora_files["a"]}),
        ("image_resize", {"src": str(lora_files["tmp"]), "dst": str(lora_files["tmp"].parent / "resized")}),
    ]
    for tool, script in scripts:
        argv, asker = _tool(tool, script)
        assert argv is not None, tool
        for q in asker.asked:
            assert q.help and q.prompt and q.title, (tool, q.key)


def test_question_checks_directly():
    q = Question(key="x", kind="number", prompt="?", default=1.0, low=-1, high=4)
    assert q.check_answer("4")[0] == 4.0 and q.check_answer("-1.5")[1] == "must be from -1 to 4, got -1.5"
    assert q.check_answer("nan")[1] == "expected a finite number, got 'nan'"
    choice = Question(key="c", kind="choice", prompt="?", default="a", options=("a", "b"), labels={"b": "Bee"})
    assert choice.check_answer("bee")[0] == "b" and choice.check_answer("z")[1] == "choose one of: a, Bee"
    hub = Question(key="m", kind="path", prompt="?", path_kind="model")
    assert hub.check_answer("runwayml/stable-diffusion-v1-5")[0] == "runwayml/stable-diffusion-v1-5"
    assert ask(ScriptedAsker({"c": ["z", "B"]}), choice) == "b"


# ------------------------------------------------------------------------------------------ SDXL in the wizard
@pytest.fixture
def xl_model(tmp_path):
    """An SDXL checkpoint as far as its header goes (detection reads nothing else)."""
    from tests.test_argstore import fake_model

    return fake_model(tmp_path / "xl.safetensors", "sdxl", single_file=True)


def _sizes(store):
    return store.train_resolution, store.min_bucket_resolution, store.max_bucket_resolution


def test_an_sdxl_model_is_preselected_and_gets_sdxl_sized_questions(paths, xl_model):
    store, asker = run_wizard(answers(paths, base_model=xl_model))
    keys = asker.keys
    assert keys.index("model_type") == keys.index("base_model") + 1  # right after the model, before the images
    question = asker.questions("model_type")[0]
    assert question.default == "sdxl" and question.help.startswith("the model file says SDXL")
    assert set(question.options) == {"sd1", "sd2", "sdxl", "flux"} and "Pony" in question.label("sdxl")
    resolution = asker.questions("train_resolution")[0]
    assert resolution.default == 1024 and "SDXL models train at 1024" in resolution.prompt
    assert "clip_skip" not in keys  # SDXL always uses the penultimate layers
    assert asker.questions("no_half_vae")[0].default is True  # fp16: the SDXL VAE overflows
    assert (store.sdxl, store.v2, store.no_half_vae) == (True, False, True)
    assert _sizes(store) == (1024, 512, 2048)
    assert "cache_text_encoder_outputs" not in keys and store.cache_text_encoder_outputs is False
    details = asker.questions("summary")[0].details
    assert "  sdxl: True" in details and "  max_bucket_resolution: 2048" in details


def test_model_type_default_without_a_readable_header(paths, tmp_path):
    from tests.test_argstore import fake_model

    store, asker = run_wizard(answers(paths, base_model=fake_model(tmp_path / "sd1", "sd1")))
    assert asker.questions("model_type")[0].default == "sd1" and _sizes(store) == (512, 320, 960)
    # a .ckpt (pickle: torch would be needed) or an unreadable file: asked, preselected from the settings
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    for model in (str(ckpt), paths["base_model"]):
        store, asker = run_wizard(answers(paths, base_model=model), ArgStore(sdxl=True))
        question = asker.questions("model_type")[0]
        assert question.default == "sdxl" and question.help.startswith("could not be told from the file")
        assert store.sdxl and _sizes(store) == (1024, 512, 2048)


def test_sdxl_sizes_follow_the_model_type_and_leave_the_users_own(paths, xl_model):
    # told it is SD 1.x after all: the SD sizes, clip skip asked
    store, asker = run_wizard(answers(paths, base_model=xl_model, model_type="sd1"))
    assert (store.sdxl, _sizes(store)) == (False, (512, 320, 960)) and "clip_skip" in asker.keys
    # Back from the summary with another answer: sizes follow again
    store, asker = run_wizard(answers(paths, base_model=xl_model, model_type=["sdxl", "sd1"], summary=["back", "start"]))
    assert [q.default for q in asker.questions("train_resolution")] == [1024, 512] and _sizes(store) == (512, 320, 960)
    # sizes the user chose are theirs
    store, asker = run_wizard(answers(paths, base_model=xl_model), ArgStore(train_resolution=768))
    assert asker.questions("train_resolution")[0].default == 768 and _sizes(store) == (768, 512, 2048)
    store, _ = run_wizard(answers(paths, base_model=xl_model, train_resolution=512))
    assert _sizes(store) == (512, 512, 2048)
    store, _ = run_wizard(answers(paths, model_type="sd1"), ArgStore(train_resolution=1024))  # an ArgsList.py edit
    assert _sizes(store) == (1024, 320, 1024)  # the bucket range widened to hold it, as for any resolution
    # the sizes the command line gave an SDXL model are its defaults: another model type takes them back
    from frontend.resolve import resolve_settings

    defaults = resolve_settings({"base_model": xl_model}).store
    assert _sizes(defaults) == (1024, 512, 2048)
    store, _ = run_wizard(answers(paths, model_type="sd1"), defaults)
    assert _sizes(store) == (512, 320, 960)
    # no_half_vae is only asked about for SDXL under fp16
    store, asker = run_wizard(answers(paths, base_model=xl_model, mixed_precision="bf16"))
    assert "no_half_vae" not in asker.keys and not store.no_half_vae
    _, asker = run_wizard(answers(paths))
    assert "no_half_vae" not in asker.keys and "model_type" in asker.keys


def test_text_encoder_cache_only_for_unet_only_and_fixed_captions(paths, xl_model):
    store, asker = run_wizard(answers(paths, base_model=xl_model),
                              ArgStore(cache_text_encoder_outputs=True, cache_text_encoder_outputs_to_disk=True))
    assert "cache_text_encoder_outputs" not in asker.keys  # the text encoder is trained: its outputs change
    assert (store.cache_text_encoder_outputs, store.cache_text_encoder_outputs_to_disk) == (False, False)
    store, asker = run_wizard(answers(paths, base_model=xl_model, train_parts="unet", cache_text_encoder_outputs=True,
                                      cache_text_encoder_outputs_to_disk=True))
    question = asker.questions("cache_text_encoder_outputs")[0]
    assert question.help == INFOS["cache_text_encoder_outputs"].help and "shuffle_captions" in question.help
    assert (store.unet_only, store.cache_text_encoder_outputs, store.cache_text_encoder_outputs_to_disk) == \
        (True, True, True)
    # shuffled captions change every epoch: yes is refused with the reason, no goes on
    store, asker = run_wizard(answers(paths, train_parts="unet", shuffle_captions=True,
                                      cache_text_encoder_outputs=[True, False]))
    refused = asker.questions("cache_text_encoder_outputs")[1].error
    assert "captions change during training (shuffle_captions)" in refused and "answer no" in refused
    assert store.shuffle_captions and not store.cache_text_encoder_outputs
    assert "cache_text_encoder_outputs_to_disk" not in asker.keys
    # a loaded setup with caption dropout: the question starts at no
    _, asker = run_wizard(answers(paths, train_parts="unet"),
                          ArgStore(caption_dropout_rate=0.1, cache_text_encoder_outputs=True))
    assert asker.questions("cache_text_encoder_outputs")[0].default is False


def test_load_json_with_a_new_sdxl_model_sizes_the_file_and_says_so(paths, xl_model):
    job = _saved_job(paths)
    store, asker = run_wizard({"start": "load_json", "load_json_path": job, "reask_paths": True,
                               "base_model": xl_model})
    assert asker.questions("model_type")[0].default == "sdxl" and "train_resolution" not in asker.keys
    assert store.sdxl and _sizes(store) == (1024, 512, 2048) and store.net_dim == 8
    details = asker.questions("summary")[0].details
    assert ("note: sized for SDXL: train_resolution 512 -> 1024, min_bucket_resolution 320 -> 512, "
            "max_bucket_resolution 960 -> 2048") in details


def test_the_json_of_an_sdxl_wizard_run_equals_the_command_lines(paths, xl_model, monkeypatch):
    import popups
    from frontend.app import run_main

    tmp = paths["tmp"]
    asker = ScriptedAsker(answers(paths, base_model=xl_model, save_json=True, save_json_folder=str(tmp / "wizard"),
                                  save_json_only=True, train_parts="unet", cache_text_encoder_outputs=True))
    monkeypatch.setattr(popups, "open_asker", lambda *a, **k: asker)
    assert run_main(["--popup"]) == 0
    # the command line gets the same 1024 px and 512-2048 buckets from the model's header
    assert run_main(["--base_model", xl_model, "--img_folder", paths["img_folder"], "--output_folder",
                     paths["output_folder"], "--save_json_path", str(tmp / "cli"), "--save_json_only", "--sdxl",
                     "--no_half_vae", "--unet_only", "--cache_text_encoder_outputs"]) == 0
    (wizard_file,), (cli_file,) = list((tmp / "wizard").iterdir()), list((tmp / "cli").iterdir())
    wizard_json = json.loads(wizard_file.read_text(encoding="utf-8"))
    cli_json = json.loads(cli_file.read_text(encoding="utf-8"))
    assert wizard_json.pop("save_json_folder") != cli_json.pop("save_json_folder")
    assert wizard_json == cli_json and wizard_json["train_resolution"] == 1024


# ------------------------------------------------------------------------------------------ GPU memory recipes
# the documented recipes (README "The guided wizard"), written out here rather than read from popups.gpu_memory
RECIPES = {
    ("sd1", "6gb"): dict(gradient_checkpointing=True, cache_latents=True, batch_size=1, optimizer_type="AdamW8bit",
                         mixed_precision="fp16"),
    ("sd1", "8gb"): dict(gradient_checkpointing=False, cache_latents=True, batch_size=2),
    ("sd1", "16gb"): dict(gradient_checkpointing=False, cache_latents=True, batch_size=4),
    ("sd2", "6gb"): dict(gradient_checkpointing=True, cache_latents=True, batch_size=1, optimizer_type="AdamW8bit",
                         mixed_precision="fp16"),
    ("sdxl", "8gb"): dict(gradient_checkpointing=True, cache_latents=True, cache_latents_to_disk=True, unet_only=True,
                          cache_text_encoder_outputs=True, fp8_base=True, batch_size=1, optimizer_type="AdamW8bit",
                          mixed_precision="bf16", no_half_vae=True),
    ("sdxl", "12gb"): dict(gradient_checkpointing=True, cache_latents=True, cache_latents_to_disk=False, unet_only=True,
                           cache_text_encoder_outputs=True, fp8_base=False, batch_size=1, optimizer_type="AdamW8bit",
                           mixed_precision="bf16", no_half_vae=False),
    ("sdxl", "16gb"): dict(gradient_checkpointing=True, cache_latents=True, unet_only=False,
                           cache_text_encoder_outputs=False, fp8_base=False, batch_size=2, mixed_precision="bf16",
                           cache_latents_to_disk=False, no_half_vae=False),
    ("sdxl", "24gb"): dict(gradient_checkpointing=False, cache_latents=True, unet_only=False,
                           cache_text_encoder_outputs=False, fp8_base=False, batch_size=4, mixed_precision="bf16",
                           cache_latents_to_disk=False, no_half_vae=False),
}


def _differences(store, other):
    return {name: getattr(store, name) for name in INFOS if getattr(store, name) != getattr(other, name)}


def _check_runs(store):
    """validate_store and the engine preflight's settings checks, as on a CUDA machine."""
    from frontend.resolve import validate_store
    from frontend.settings_map import to_train_config
    from sd_scripts.training.preflight import settings_checks as preflight
    from sd_scripts.models.families import check_family_settings

    validate_store(store)
    config = to_train_config(store, has_cuda=True, has_xformers=False).config
    assert [str(e) for e in preflight.check_settings(config)] == []
    assert check_family_settings(config)[0] == []


@pytest.mark.parametrize("model_type,answer", list(RECIPES))
def test_each_gpu_memory_recipe_sets_exactly_its_settings_and_validates(paths, monkeypatch, model_type, answer):
    from sd_scripts.training.preflight import settings_checks as preflight

    monkeypatch.setattr(preflight, "_cuda_available", lambda: True)  # fp16 and xformers need CUDA
    store, asker = run_wizard(answers(paths, model_type=model_type, gpu_memory=answer))
    kept, _ = run_wizard(answers(paths, model_type=model_type, gpu_memory="keep"))
    recipe = RECIPES[model_type, answer]
    assert {name: getattr(store, name) for name in recipe} == recipe
    assert _differences(store, kept) == {k: v for k, v in recipe.items() if v != getattr(kept, k)}
    question = asker.questions("gpu_memory")[0]
    assert asker.keys.index("model_type") < asker.keys.index("gpu_memory") < asker.keys.index("img_folder")
    assert question.default == "keep" and "no CUDA GPU found" in question.help and question.options[0] == "keep"
    assert f"  gpu_memory: {question.label(answer)}" in asker.questions("summary")[0].details
    # the later questions start from the recipe's values
    assert asker.questions("batch_size")[0].default == recipe["batch_size"]
    _check_runs(store)


def test_the_gpu_memory_answers_follow_the_model_type(paths):
    _, asker = run_wizard(answers(paths, model_type="sd2"))
    assert asker.questions("gpu_memory")[0].options == ("keep", "6gb", "8gb", "16gb")
    _, asker = run_wizard(answers(paths, model_type="sdxl"))
    question = asker.questions("gpu_memory")[0]
    assert question.options == ("keep", "8gb", "12gb", "16gb", "24gb") and "SDXL" in question.prompt
    assert "UNet only" in question.label("8gb") and question.label("keep").startswith("Keep my settings")


def test_a_gpu_memory_recipe_keeps_the_users_own_settings(paths):
    own = ArgStore(batch_size=3, optimizer_type="Lion", mixed_precision="no", text_only=True)
    store, asker = run_wizard(answers(paths, model_type="sdxl", gpu_memory="8gb"), own)
    assert asker.questions("gpu_memory")[0].default == "keep"  # memory settings of their own: nothing preselected
    assert (store.batch_size, store.optimizer_type, store.mixed_precision, store.text_only) == (3, "Lion", "no", True)
    assert not (store.unet_only or store.fp8_base or store.cache_text_encoder_outputs)
    assert store.gradient_checkpointing and store.cache_latents_to_disk and store.no_half_vae
    details = asker.questions("summary")[0].details
    assert "  unet_only on left out: text_only is on" in details
    assert "  fp8_base on left out: it needs mixed_precision fp16 or bf16" in details
    assert "  cache_text_encoder_outputs on left out: it needs UNet-only training" in details


def test_a_gpu_memory_recipe_does_not_cache_captions_that_change(paths):
    store, asker = run_wizard(answers(paths, model_type="sdxl", gpu_memory="12gb"), ArgStore(shuffle_captions=True))
    assert store.unet_only and not store.cache_text_encoder_outputs
    assert asker.questions("cache_text_encoder_outputs")[0].default is False
    assert ("  cache_text_encoder_outputs on left out: the captions change during training (shuffle_captions)"
            in asker.questions("summary")[0].details)
    # captions shuffled after the recipe was chosen: the cache question starts at no, and the result validates
    store, asker = run_wizard(answers(paths, model_type="sdxl", gpu_memory="8gb", shuffle_captions=True))
    assert asker.questions("cache_text_encoder_outputs")[0].default is False
    assert store.unet_only and store.shuffle_captions and not store.cache_text_encoder_outputs
    from frontend.resolve import validate_store

    validate_store(store)


def test_changing_the_gpu_memory_answer_recomputes(paths):
    direct = {answer: run_wizard(answers(paths, model_type="sdxl", gpu_memory=answer))[0]
              for answer in ("keep", "12gb", "24gb")}
    for first, then in (("8gb", "24gb"), ("8gb", "keep"), ("16gb", "12gb")):
        store, asker = run_wizard(answers(paths, model_type="sdxl", gpu_memory=[first, then],
                                          summary=["back", "start"]))
        assert asker.questions("gpu_memory")[1].default == first
        assert store == direct[then], (first, then)
        assert f"  gpu_memory: {asker.questions('gpu_memory')[1].label(then)}" in asker.questions("summary")[1].details
    # another model type: the SDXL-only switches go back too
    store, _ = run_wizard(answers(paths, model_type=["sdxl", "sd1"], gpu_memory=["8gb", "16gb"],
                                  summary=["back", "start"]))
    assert store == run_wizard(answers(paths, model_type="sd1", gpu_memory="16gb"))[0]
    # the same answer again keeps what the user answered after it, even a default value
    store, asker = run_wizard(answers(paths, model_type="sdxl", gpu_memory="24gb", batch_size=1,
                                      summary=["back", "start"]))
    assert [q.default for q in asker.questions("batch_size")] == [4, 1] and store.batch_size == 1
    # ...and another answer keeps values the user changed away from the recipe's
    store, _ = run_wizard(answers(paths, model_type="sdxl", gpu_memory=["8gb", "24gb"], batch_size=3,
                                  summary=["back", "start"]))
    assert store.batch_size == 3 and not store.fp8_base and not store.unet_only


@pytest.mark.parametrize("gib,sd,sdxl", [(4.0, "6gb", "8gb"), (6.0, "6gb", "8gb"), (7.8, "8gb", "8gb"),
                                         (10.0, "8gb", "12gb"), (12.0, "8gb", "12gb"), (16.0, "16gb", "16gb"),
                                         (23.6, "16gb", "24gb"), (80.0, "16gb", "24gb")])
def test_the_detected_gpu_preselects_its_recipe(paths, monkeypatch, gib, sd, sdxl):
    from popups import gpu_memory

    probes = []

    def probe():
        probes.append(1)
        return "NVIDIA GeForce RTX Test", gib

    monkeypatch.setattr(gpu_memory, "probe_gpu", probe)
    store, asker = run_wizard(answers(paths, model_type="sd1", summary=["back", "start"]))
    question = asker.questions("gpu_memory")[0]
    assert question.default == sd and f"found NVIDIA GeForce RTX Test with {gib:.1f} GB" in question.help
    assert store.batch_size == RECIPES.get(("sd1", sd), {}).get("batch_size", store.batch_size)
    assert len(probes) == 1  # probed once, even going Back
    _, asker = run_wizard(answers(paths, model_type="sdxl"))
    assert asker.questions("gpu_memory")[0].default == sdxl
    # another model type on the way Back: that family's recipe for the card
    store, asker = run_wizard(answers(paths, model_type=["sdxl", "sd1"], summary=["back", "start"]))
    assert [q.default for q in asker.questions("gpu_memory")] == [sdxl, sd]
    assert store == run_wizard(answers(paths, model_type="sd1"))[0]
    # settings of the user's own, or a loaded JSON file: keep them
    _, asker = run_wizard(answers(paths, model_type="sdxl"), ArgStore(gradient_checkpointing=True))
    assert asker.questions("gpu_memory")[0].default == "keep"
    _, asker = run_wizard({"start": "load_json", "load_json_path": _saved_job(paths), "reask_paths": True})
    assert asker.questions("gpu_memory")[0].default == "keep"


def test_a_loaded_json_file_gets_a_recipe_only_when_asked_and_says_so(paths):
    job = _saved_job(paths)
    store, asker = run_wizard({"start": "load_json", "load_json_path": job, "reask_paths": False})
    assert "gpu_memory" not in asker.keys
    store, asker = run_wizard({"start": "load_json", "load_json_path": job, "reask_paths": True, "gpu_memory": "16gb"})
    assert (store.batch_size, store.optimizer_type, store.net_dim) == (4, "Lion", 8)  # the file's own optimizer stays
    assert "note: GPU memory 16gb: batch_size 4" in asker.questions("summary")[0].details


def test_probe_gpu_asks_a_loaded_torch_or_nvidia_smi(monkeypatch):
    import shutil
    import subprocess
    import types

    from popups import gpu_memory

    props = types.SimpleNamespace(name="NVIDIA H100", total_memory=80 * 2**30)
    cuda = types.SimpleNamespace(is_available=lambda: True, get_device_properties=lambda index: props)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert PROBE_GPU() == ("NVIDIA H100", 80.0)
    cuda.is_available = lambda: False
    assert PROBE_GPU() is None
    # torch not loaded: nvidia-smi answers, and torch stays unloaded
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert PROBE_GPU() is None
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="NVIDIA GeForce RTX 3060, 12288\n", stderr="")

    monkeypatch.setattr(subprocess, "run", run)
    assert PROBE_GPU() == ("NVIDIA GeForce RTX 3060", 12.0) and "--query-gpu=name,memory.total" in calls[0]
    assert "torch" not in sys.modules

    def broken(cmd, **kwargs):
        raise subprocess.CalledProcessError(9, cmd)

    monkeypatch.setattr(subprocess, "run", broken)
    assert PROBE_GPU() is None
    assert gpu_memory.suggested_answer("sdxl", 12.0) == "12gb"


def test_a_recipe_leaves_out_what_other_settings_pin():
    from popups.gpu_memory import plan_recipe

    changes, skipped = plan_recipe(ArgStore(full_fp16=True), "sdxl", "8gb")
    assert "mixed_precision" not in changes and changes["fp8_base"] is True  # fp16 carries float8 too
    assert skipped == ["mixed_precision bf16 left out: full_fp16 needs fp16"]
    own_cache = ArgStore(unet_only=True, cache_text_encoder_outputs_to_disk=True)
    changes, skipped = plan_recipe(own_cache, "sdxl", "24gb")
    assert "unet_only" not in changes and "cache_text_encoder_outputs" not in changes
    assert skipped == [] and changes["batch_size"] == 4  # the user's own cache and UNet-only training stay
    assert plan_recipe(ArgStore(), "sd", "keep") == ({}, [])


# ------------------------------------------------------------------------------------------ FLUX.1 memory recipes
# the documented FLUX.1 recipes (README "The guided wizard"; kohya's FLUX.1 guide, community figures)
FLUX_RECIPES = {
    "12gb": dict(gradient_checkpointing=True, cache_latents=True, cache_latents_to_disk=True, unet_only=True,
                 cache_text_encoder_outputs=True, fp8_base=True, blocks_to_swap=16, batch_size=1,
                 optimizer_type="AdamW8bit", mixed_precision="bf16"),
    "16gb": dict(gradient_checkpointing=True, cache_latents=True, cache_latents_to_disk=True, unet_only=True,
                 cache_text_encoder_outputs=True, fp8_base=True, blocks_to_swap=8, batch_size=1,
                 optimizer_type="AdamW8bit", mixed_precision="bf16"),
    "24gb": dict(gradient_checkpointing=True, cache_latents=True, cache_latents_to_disk=False, unet_only=True,
                 cache_text_encoder_outputs=True, fp8_base=True, blocks_to_swap=0, batch_size=2, mixed_precision="bf16"),
}


def _flux_config_problems(store):
    """validate_store, preflight's settings checks and the memory-saver checks for a full-size FLUX.1, on CUDA."""
    from frontend.resolve import validate_store
    from frontend.settings_map import to_train_config
    from sd_scripts.models.families import check_family_settings, get_family
    from sd_scripts.models.memory_settings import memory_setting_problems
    from sd_scripts.training.preflight import settings_checks as preflight

    validate_store(store)
    config = to_train_config(store, has_cuda=True, has_xformers=False).config
    info = {"double_blocks": 19, "single_blocks": 38}
    return ([str(e) for e in preflight.check_settings(config)] + [str(e) for e in check_family_settings(config)[0]]
            + [str(e) for e in memory_setting_problems(config, get_family("flux"), info)[0]])


@pytest.mark.parametrize("answer", list(FLUX_RECIPES))
def test_each_flux_memory_recipe_sets_exactly_its_settings_and_validates(paths, monkeypatch, answer):
    from popups.gpu_memory import MEMORY_LABELS, MEMORY_RECIPES, plan_recipe, recipe_family
    from sd_scripts.training.preflight import settings_checks as preflight

    monkeypatch.setattr(preflight, "_cuda_available", lambda: True)
    assert recipe_family("flux") == "flux" and list(MEMORY_RECIPES["flux"]) == ["12gb", "16gb", "24gb"]
    assert "community figures" in MEMORY_LABELS["flux"][answer]
    store = ArgStore()
    changes, skipped = plan_recipe(store, "flux", answer)
    recipe = FLUX_RECIPES[answer]
    assert skipped == []
    assert changes == {k: v for k, v in recipe.items() if v != getattr(store, k)}
    changed = store.replace(**changes)
    assert {name: getattr(changed, name) for name in recipe} == recipe
    assert _flux_config_problems(changed.replace(base_model=paths["base_model"], img_folder=paths["img_folder"],
                                                 output_folder=paths["output_folder"])) == []


def test_a_flux_memory_recipe_keeps_the_users_own_settings_and_leaves_out_clashes():
    from popups.gpu_memory import plan_recipe, suggested_answer

    own = ArgStore(batch_size=3, blocks_to_swap=4, mixed_precision="no", shuffle_captions=True)
    changes, skipped = plan_recipe(own, "flux", "12gb")
    assert "batch_size" not in changes and "blocks_to_swap" not in changes and "mixed_precision" not in changes
    assert "fp8_base" not in changes and "cache_text_encoder_outputs" not in changes
    assert any(line.startswith("fp8_base on left out") for line in skipped)
    assert any(line.startswith("cache_text_encoder_outputs on left out") for line in skipped)
    assert changes["gradient_checkpointing"] is True and own.replace(**changes).optimizer_type == "AdamW8bit"
    assert [suggested_answer("flux", gib) for gib in (8.0, 11.6, 15.6, 23.6, 79.6)] == \
        ["12gb", "12gb", "16gb", "24gb", "24gb"]


@pytest.mark.skipif("flux" not in __import__("popups.training_flow", fromlist=["MODEL_TYPES"]).MODEL_TYPES,
                    reason="the wizard's FLUX.1 model type comes with the FLUX.1 front end")
@pytest.mark.parametrize("answer", list(FLUX_RECIPES))
def test_the_wizard_offers_the_flux_recipes(paths, answer):
    store, asker = run_wizard(answers(paths, model_type="flux", gpu_memory=answer))
    question = asker.questions("gpu_memory")[0]
    assert question.options == ("keep", "12gb", "16gb", "24gb") and "community figures" in question.label(answer)
    assert {name: getattr(store, name) for name in FLUX_RECIPES[answer]} == FLUX_RECIPES[answer]


def test_flux_branch_asks_for_the_parts_and_starts_from_kohyas_flux_settings(paths, tiny_flux_files):
    model = str(tiny_flux_files["transformer"])
    parts = {name: str(tiny_flux_files[name]) for name in ("clip_l", "t5xxl", "ae")}
    store, asker = run_wizard(answers(paths, base_model=model, **parts))
    assert asker.questions("model_type")[0].default == "flux"
    assert [q.optional for q in (asker.questions(n)[0] for n in parts)] == [False, False, False]
    assert {n: getattr(store, n) for n in parts} == parts
    assert "clip_skip" not in asker.keys and "min_snr_gamma" not in asker.keys
    assert asker.questions("gpu_memory")[0].default == "keep"  # no GPU here
    assert {"guidance_scale", "timestep_sampling", "model_prediction_type"} <= set(asker.keys)
    assert (store.net_dim, store.learning_rate, store.train_resolution) == (16, 1e-4, 1024)
    assert (store.unet_only, store.cache_latents, store.cache_text_encoder_outputs) == (True, True, True)
    assert (store.timestep_sampling, store.model_prediction_type, store.guidance_scale) == ("shift", "raw", 1.0)
    assert (store.clip_skip, store.max_clip_token_length, store.min_snr_gamma) == (1, 75, None)
    # the user's own values stay
    store, _ = run_wizard(answers(paths, base_model=model, **parts), ArgStore(net_dim=8))
    assert store.net_dim == 8


# ------------------------------------------------------------------------------------------ steps from the declarations
class _RecordingWizard(TrainingWizard):
    """The wizard, noting every setting it writes (``set``), whatever the step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.written: set[str] = set()

    def set(self, **changes):
        self.written.update(changes)
        super().set(**changes)


def test_each_wizard_step_asks_exactly_the_settings_declared_for_it(paths):
    """A question decides the settings declared for its step (``wizard=`` in sd_scripts/core/settings.py) and no
    others; every declared one is asked on some branch; the wizard writes no setting declared for no step."""
    from sd_scripts.core.settings import SETTINGS, WIZARD_STEPS

    queue = paths["tmp"] / "queue"
    queue.mkdir()
    (queue / "a.json").write_text("{}", encoding="utf-8")
    reg = make_dataset(paths["tmp"] / "reg", folder="1_shape", count=2)
    runs = [
        ({"start": "queue", "multi_run_folder": str(queue)}, None),
        ({"start": "load_json", "load_json_path": _saved_job(paths), "reask_paths": False}, None),
        (answers(paths, save_json=True, save_json_folder=str(paths["tmp"] / "js"), model_type="sd2", use_reg=True,
                 reg_img_folder=str(reg), network_type="LoKr", train_parts="unet", scheduler="polynomial",
                 length_mode="steps", shuffle_captions=True, cache_latents=False, sample_images=True,
                 sample_prompts=paths["prompts"], sample_when="steps", summary=CANCEL), ArgStore(alpha_mask=True)),
        (answers(paths, model_type="sdxl", gpu_memory="8gb", network_type="LoCon", train_parts="both",
                 scheduler="cosine_with_restarts", mixed_precision="fp16", summary=CANCEL), None),
        (answers(paths, model_type="flux", gpu_memory="12gb", timestep_sampling="shift", summary=CANCEL), None),
    ]
    asked: dict[str, set[str]] = {}
    written: set[str] = set()
    for script, defaults in runs:
        asker = ScriptedAsker(script)
        wizard = _RecordingWizard(asker, defaults or ArgStore())
        wizard.run()
        written |= wizard.written
        for q in asker.asked:
            assert q.key not in INFOS or q.key in q.settings, q.key  # a question about a setting names it
            for name in q.settings:
                assert declared(name).wizard == q.title, (q.key, name)
                asked.setdefault(q.title, set()).add(name)
    declared_steps = {step: {s.name for s in SETTINGS if s.wizard == step} for step in WIZARD_STEPS}
    assert asked == declared_steps
    assert not {name for name in written if declared(name).wizard is None}


def test_a_question_at_another_step_than_declared_is_refused(paths):
    wizard = TrainingWizard(ScriptedAsker({}), ArgStore())
    wizard.step = "Saving"
    with pytest.raises(LookupError, match="net_dim .* declares wizard='Network'"):
        wizard.question("net_dim", "Network dim")


def test_the_summary_lists_the_choices_under_their_steps_and_the_other_settings(paths):
    store, asker = run_wizard(answers(paths, gpu_memory="6gb", summary=CANCEL), ArgStore(noise_offset=0.05))
    details = asker.questions("summary")[0].details
    gpu = details.index("GPU memory")
    assert details[gpu + 1].startswith("  gpu_memory: 6 GB") and details[gpu + 2] == "  gradient_checkpointing: True"
    other = details.index("Other settings (not asked here)")
    assert details[other + 1] == "  noise_offset: 0.05"
    assert details.index("Paths") < details.index("Model") < gpu < details.index("Optimizer") < other
