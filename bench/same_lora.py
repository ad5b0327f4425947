"""Check that this tree trains byte-identical LoRA files to another revision (for refactors that must not change results).

    .venv/bin/python bench/same_lora.py --base 123ef47

Builds tiny SD1 and SDXL models once (with this tree's code), then trains the same short runs with this tree's
``main.py`` and with the base revision's (checked out into a temporary git worktree, using this tree's .venv): an SD1
LoRA with text encoder, an SDXL LoRA with cached text-encoder outputs, and an SD1 LyCORIS LoHa with conv layers. It
prints the SHA-256 of each pair of files' tensor bytes and exits 1 when any pair differs: the tensors (names, dtypes,
shapes, offsets and data) must be the same bytes, and the metadata the same text except what no two runs share: the
start and end times (``ss_training_started_at``, ``ss_training_finished_at``, ``modelspec.date``) and the random
``ss_session_id``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = os.path.join(ROOT, "examples", "quickstart", "dataset")

COMMON = {"img_folder": DATASET, "net_dim": 4, "alpha": 2, "train_resolution": 64, "min_bucket_resolution": 64,
          "max_bucket_resolution": 128, "bucket_reso_steps": 32, "batch_size": 2, "max_steps": 6,
          "learning_rate": 0.001, "optimizer_type": "AdamW", "scheduler": "cosine", "mixed_precision": "no",
          "save_precision": "float", "cache_latents": True, "test_seed": 23, "xformers": False, "flip_aug": False,
          "shuffle_captions": True, "keep_tokens": 1, "tag_occurrence_txt_file": False}
CASES = {
    "sd1_lora": ("sd1", {}),
    "sdxl_lora": ("sdxl", {"sdxl": True, "unet_only": True, "cache_text_encoder_outputs": True, "no_half_vae": True,
                           "shuffle_captions": False}),  # cached text-encoder outputs need fixed captions
    "sd1_lycoris_loha": ("sd1", {"lyco": True, "network_args": {"algo": "loha", "conv_dim": 4, "conv_alpha": 1}}),
}


def _train(tree: str, work: str, label: str, case: str, model: str, overrides: dict) -> str:
    out = os.path.join(work, label, case)
    settings = dict(COMMON, base_model=model, output_folder=out, change_output_name=case,
                    tokenizer_cache_dir=os.path.join(model, "tokenizer"), **overrides)
    path = os.path.join(work, f"{label}-{case}.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(settings, handle)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=tree)
    subprocess.run([sys.executable, os.path.join(tree, "main.py"), "--load_json_path", path], cwd=tree, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    return os.path.join(out, case + ".safetensors")


_PER_RUN = ("ss_training_started_at", "ss_training_finished_at", "modelspec.date", "ss_session_id")


def _read(path: str) -> tuple[dict, bytes]:
    """(header without the per-run metadata, tensor bytes) of a safetensors file."""
    with open(path, "rb") as handle:
        raw = handle.read()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    for key in _PER_RUN:
        header.get("__metadata__", {}).pop(key, None)
    return header, raw[8 + size:]


def _compare(ours_path: str, base_path: str) -> tuple[bool, str, str, str]:
    """(same, our tensors' SHA-256, the base's, what differs)."""
    ours, base = _read(ours_path), _read(base_path)
    sha_ours, sha_base = hashlib.sha256(ours[1]).hexdigest(), hashlib.sha256(base[1]).hexdigest()
    meta_ours, meta_base = ours[0].pop("__metadata__", {}), base[0].pop("__metadata__", {})
    what = []
    if sha_ours != sha_base or ours[0] != base[0]:
        what.append("tensors")
    changed = sorted(k for k in set(meta_ours) | set(meta_base) if meta_ours.get(k) != meta_base.get(k))
    if changed:
        what.append("metadata " + ", ".join(changed[:8]))
    return not what, sha_ours, sha_base, "; ".join(what)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare against, e.g. 123ef47")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    from sd_scripts.testing.tiny_models import save_tiny_diffusers

    with tempfile.TemporaryDirectory() as work:
        base_tree = os.path.join(work, "base-tree")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", base_tree, args.base], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            models = {}
            for family in {CASES[c][0] for c in args.cases}:
                models[family] = os.path.join(work, "model-" + family)
                save_tiny_diffusers(models[family], family, seed=0)
            differ = 0
            for case in args.cases:
                family, overrides = CASES[case]
                ours_path = _train(ROOT, work, "this", case, models[family], overrides)
                base_path = _train(base_tree, work, "base", case, models[family], overrides)
                same, ours, base, what = _compare(ours_path, base_path)
                differ += not same
                print(f"{case:18s} {'same' if same else 'DIFFERENT (' + what + ')'}  this {ours[:16]}  "
                      f"{args.base} {base[:16]}", flush=True)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", base_tree], check=False)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
