"""Run one training from a checked ArgStore: map, preflight, write the side files, train, upload.

The engine (torch, diffusers) is imported here, when a training actually starts. Nothing is written
before preflight has passed: then the resolved settings (``<name>_settings.json``) and the tag list
(``<name>.txt``) go beside the LoRA, and the engine trains.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any, Callable

from .json_io import saved_settings_dict, write_json_atomic
from .settings_map import to_train_config
from .tag_list import merge_tag_counts, read_caption_tags, tag_list_path, write_tag_list

__all__ = ["prepare_training", "run_training", "is_main_process", "settings_path_for"]


def is_main_process() -> bool:
    """False in the extra processes of a multi-GPU ``accelerate launch``: they write no side files."""
    return os.environ.get("RANK", "0") in ("", "0")


def settings_path_for(output_folder: str, model_name: str) -> str:
    return os.path.join(output_folder, f"{model_name}_settings.json")


def _say(text: str) -> None:
    print(text, flush=True)


def prepare_training(store: Any, *, has_cuda: bool | None = None, has_xformers: bool | None = None,
                     say: Callable[[str], None] = _say):
    """Fix the seed, map to TrainConfig and preflight; return (mapped, plan). Raises UserErrors."""
    from sd_scripts.training.preflight import preflight

    if store.test_seed is None and os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        # Picked here so the saved settings repeat the run exactly. With several processes each would
        # pick its own, so there the engine decides.
        store = store.replace(test_seed=random.randint(0, 2**31 - 1))
        say(f"note: test_seed was not set; using {store.test_seed} (saved with the run's settings)")
    mapped = to_train_config(store, has_cuda=has_cuda, has_xformers=has_xformers)
    for note in mapped.notes:
        say(note)
    plan = preflight(mapped.config)
    for line in getattr(plan, "summary", None) or []:
        say(line)  # e.g. "dataset: 12 training image(s) in 2 folder(s), 120 with repeats; 3 without a caption file"
    return mapped, plan


def _tag_frequency(plan: Any, store: Any) -> dict[str, dict[str, int]]:
    dataset = getattr(plan, "dataset", None)
    frequency = getattr(dataset, "tag_frequency", None)
    if frequency is not None:
        return frequency
    if store.img_folder and os.path.isdir(store.img_folder):
        return read_caption_tags(store.img_folder, store.caption_extension)
    return {}


def write_side_files(mapped: Any, plan: Any, say: Callable[[str], None] = _say) -> None:
    """The resolved settings and the tag list, beside where the LoRA will be saved."""
    store, config = mapped.store, mapped.config
    if not is_main_process():
        return
    os.makedirs(config.output_dir, exist_ok=True)
    settings_path = settings_path_for(config.output_dir, config.output_name)
    write_json_atomic(settings_path, saved_settings_dict(store.replace(save_json_folder=None, multi_run_folder=None,
                                                                     load_json_path=None)))
    say(f"settings of this run saved to {settings_path}")
    if store.tag_occurrence_txt_file:
        counts = merge_tag_counts(_tag_frequency(plan, store))
        path = write_tag_list(tag_list_path(config.output_dir, config.output_name), counts, config.output_name,
                              alphabetical=store.sort_tag_occurrence_alphabetically)
        say(f"tag list ({len(counts)} tags) written to {path}")


def _upload(store: Any, result: Any, say: Callable[[str], None]) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=store.huggingface_token or None)
    repo_type = store.huggingface_repo_type or "model"
    api.create_repo(store.huggingface_repo_id, repo_type=repo_type, exist_ok=True,
                    private=(store.huggingface_repo_visibility or "private") != "public")
    folder = (store.huggingface_path_in_repo or "").strip("/")
    files = [result.output_path] if result.output_path else []
    for path in files:
        target = f"{folder}/{os.path.basename(path)}" if folder else os.path.basename(path)
        api.upload_file(path_or_fileobj=path, path_in_repo=target, repo_id=store.huggingface_repo_id,
                        repo_type=repo_type)
        say(f"uploaded {os.path.basename(path)} to {store.huggingface_repo_id}/{target}")
    if store.save_state_to_huggingface and store.save_state:
        out = store.output_folder
        for name in sorted(os.listdir(out)):
            if os.path.isdir(os.path.join(out, name)) and name.endswith("-state"):
                target = f"{folder}/{name}" if folder else name
                api.upload_folder(folder_path=os.path.join(out, name), path_in_repo=target,
                                  repo_id=store.huggingface_repo_id, repo_type=repo_type)
                say(f"uploaded {name} to {store.huggingface_repo_id}/{target}")


def run_training(store: Any, *, callbacks: Any = None, before_train: Callable[[Any], None] | None = None,
                 has_cuda: bool | None = None, has_xformers: bool | None = None,
                 say: Callable[[str], None] = _say) -> Any:
    """Train as ``store`` says; return the engine's TrainResult. User mistakes raise UserError(s)."""
    from sd_scripts.training.loop import train

    mapped, plan = prepare_training(store, has_cuda=has_cuda, has_xformers=has_xformers, say=say)
    if before_train is not None:
        before_train(mapped.store)
    write_side_files(mapped, plan, say)
    if mapped.store.wandb_api_key:
        os.environ["WANDB_API_KEY"] = mapped.store.wandb_api_key
    if callbacks is None:
        from sd_scripts.training.callbacks import ConsoleCallbacks

        callbacks = ConsoleCallbacks(stream=sys.stderr)
    result = train(mapped.config, callbacks, plan=plan)
    if result.output_path:
        say(f"LoRA saved to {result.output_path}")
    if mapped.store.huggingface_repo_id and is_main_process():
        _upload(mapped.store, result, say)
    return result
