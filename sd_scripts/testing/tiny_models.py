"""Tiny SD-shaped models built in code, for tests, the quick start and benchmarks.

They have the real module structure of SD1/SD2/SDXL (so LoRA names, loaders and converters are
exercised for real) with a few hundred thousand random weights. Nothing is downloaded.

Tiny SDXL keeps SDXL's block layout (three levels: DownBlock2D then two cross-attention levels, two
resnets per level, linear projections, more transformer blocks on the deepest level, ``text_time``
size conditioning) and its two text encoders: CLIP (quick_gelu, width 64) and an OpenCLIP-style
``CLIPTextModelWithProjection`` (gelu, width 128, projection 96, so a transposed projection shows).
The tokenizer is a byte-level CLIP BPE built from a generated vocabulary: every text
tokenizes, common words get their own token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = [
    "TINY_WORDS",
    "build_tiny_components",
    "save_tiny_diffusers",
    "save_tiny_single_file",
    "tiny_tokenizer_cache_dir",
    "write_tiny_tokenizer",
]

TINY_WORDS = (
    "a photo of sks person dog cat red green blue white black painting style portrait woman man "
    "girl boy anime tree house sky sun water smile hat shirt dress hair eyes long short the and with in"
).split()

TINY_PAD_TOKENS = {"sd1": "<|endoftext|>", "sd2": "!", "sdxl": "<|endoftext|>", "sdxl_2": "!"}
TOKENIZER_CACHE_NAMES = {"sd1": "openai_clip-vit-large-patch14", "sd2": "stabilityai_stable-diffusion-2",
                         "sdxl": "openai_clip-vit-large-patch14", "sdxl_2": "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"}
TINY_SDXL_TIME_EMBED_DIM = 8


# CLIP's byte-to-unicode table (the standard GPT-2/CLIP reversible mapping).
def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tiny_tokenizer(folder: str | os.PathLike, pad_token: str = "<|endoftext|>") -> Path:
    """Write a tiny CLIP tokenizer (vocab.json, merges.txt, configs) into ``folder``.

    ``pad_token`` "<|endoftext|>" as SD1's tokenizer; SD2's pads with "!" (id 0).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in TINY_WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        # merge left to right: ((a b) c) ...
        current = symbols[0]
        for sym in symbols[1:]:
            merge = f"{current} {sym}"
            merged = current + sym
            if merge not in merges:
                merges.append(merge)
            if merged not in vocab:
                vocab.append(merged)
            current = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": pad_token,
                "do_lower_case": True,
            }
        ),
        encoding="utf-8",
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token}),
        encoding="utf-8",
    )
    return folder


def tokenizer_vocab_size(folder: str | os.PathLike) -> int:
    return len(json.loads((Path(folder) / "vocab.json").read_text(encoding="utf-8")))


def build_tiny_components(family: str = "sd1", seed: int = 0, tokenizer_dir: str | os.PathLike | None = None,
                          v_prediction: bool = False):
    """Return ``dict(unet, vae, text_encoder, tokenizer, scheduler)`` for ``family`` 'sd1', 'sd2' or 'sdxl'.

    SD1: CLIP with quick_gelu, UNet with 1x1-conv proj_in/out and a fixed head count.
    SD2: CLIP with gelu, UNet with linear projections and per-block head counts; with
    ``v_prediction`` the scheduler predicts v.
    SDXL: also ``text_encoder_2`` and ``tokenizer_2`` (see the module doc); ``tokenizer_dir`` may be a pair of folders.
    """
    import tempfile

    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if family == "sdxl":
        return _build_tiny_sdxl(seed, tokenizer_dir, v_prediction)
    if family not in ("sd1", "sd2"):
        raise ValueError(f"unknown tiny family {family!r}")
    sd2 = family == "sd2"
    torch.manual_seed(seed)
    hidden = 64  # one 64-wide attention head, as the single-file loader infers heads from width
    if tokenizer_dir is None:
        tokenizer_dir = tempfile.mkdtemp(prefix="tiny_tok_")
        write_tiny_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer(vocab=str(Path(tokenizer_dir) / "vocab.json"),
                              merges=str(Path(tokenizer_dir) / "merges.txt"),
                              pad_token="<|endoftext|>" if not sd2 else "!", model_max_length=77)
    te_config = CLIPTextConfig(
        vocab_size=tokenizer_vocab_size(tokenizer_dir),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=3,
        num_attention_heads=hidden // 64,
        max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(te_config)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden,
        attention_head_dim=(2, 4) if sd2 else 2,
        use_linear_projection=sd2,
        norm_num_groups=32,
    )
    vae = _tiny_vae(0.18215)
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, steps_offset=1, prediction_type="v_prediction" if v_prediction else "epsilon",
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def _tiny_tokenizer(folder, pad_token: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=str(Path(folder) / "vocab.json"), merges=str(Path(folder) / "merges.txt"),
                         pad_token=pad_token, model_max_length=77)


def _tiny_vae(scaling_factor: float):
    """Four levels, like SD's VAE: latents are 1/8 of the image size."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def _build_tiny_sdxl(seed: int, tokenizer_dir, v_prediction: bool):
    import tempfile

    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    if tokenizer_dir is None:
        base = Path(tempfile.mkdtemp(prefix="tiny_tok_"))
        tokenizer_dir = (write_tiny_tokenizer(base / "1", TINY_PAD_TOKENS["sdxl"]),
                         write_tiny_tokenizer(base / "2", TINY_PAD_TOKENS["sdxl_2"]))
    elif not isinstance(tokenizer_dir, (list, tuple)):
        tokenizer_dir = (tokenizer_dir, tokenizer_dir)
    tokenizer = _tiny_tokenizer(tokenizer_dir[0], TINY_PAD_TOKENS["sdxl"])
    tokenizer_2 = _tiny_tokenizer(tokenizer_dir[1], TINY_PAD_TOKENS["sdxl_2"])
    vocab = tokenizer_vocab_size(tokenizer_dir[0])
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=1,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64, pad_token_id=tokenizer.pad_token_id,
        **ids))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=96, pad_token_id=tokenizer_2.pad_token_id,
        **ids))
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(1, 2, 2),
        cross_attention_dim=64 + 128,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=96 + 6 * TINY_SDXL_TIME_EMBED_DIM,
        norm_num_groups=32,
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, steps_offset=1, prediction_type="v_prediction" if v_prediction else "epsilon",
    )
    return {"unet": unet, "vae": _tiny_vae(0.13025), "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "scheduler": scheduler}


def save_tiny_diffusers(folder: str | os.PathLike, family: str = "sd1", seed: int = 0, v_prediction: bool = False) -> Path:
    """Write a tiny model as a diffusers folder (StableDiffusionPipeline / StableDiffusionXLPipeline layout)."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        dirs = (write_tiny_tokenizer(folder / "tokenizer", TINY_PAD_TOKENS["sdxl"]),
                write_tiny_tokenizer(folder / "tokenizer_2", TINY_PAD_TOKENS["sdxl_2"]))
        parts = build_tiny_components(family, seed=seed, tokenizer_dir=dirs, v_prediction=v_prediction)
        pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
        pipe.save_pretrained(folder, safe_serialization=True)
        return folder
    tok_dir = folder / "tokenizer"
    write_tiny_tokenizer(tok_dir, pad_token=TINY_PAD_TOKENS[family])
    parts = build_tiny_components(family, seed=seed, tokenizer_dir=tok_dir, v_prediction=v_prediction)
    pipe = StableDiffusionPipeline(
        unet=parts["unet"], vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
        scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder




def tiny_tokenizer_cache_dir(checkpoint_path: str | os.PathLike) -> Path:
    """The ``tokenizer_cache_dir`` written by ``save_tiny_single_file`` next to ``checkpoint_path``."""
    return Path(checkpoint_path).parent / "tokenizer_cache"


def save_tiny_single_file(path: str | os.PathLike, family: str = "sd1", seed: int = 0, v_prediction: bool = False,
                          fmt: str = "safetensors") -> Path:
    """Write a tiny model as an LDM single-file checkpoint plus its sibling ``<stem>.yaml``.

    Also writes a tokenizer in kohya's ``tokenizer_cache_dir`` layout: ``tiny_tokenizer_cache_dir(path)`` /
    ``openai_clip-vit-large-patch14`` (sd1) or ``stabilityai_stable-diffusion-2`` (sd2; pad "!" as in SD2); sdxl
    writes ``openai_clip-vit-large-patch14`` and ``laion_CLIP-ViT-bigG-14-laion2B-39B-b160k`` and an SGM ``.yaml``.
    ``fmt`` "safetensors" or "ckpt" (a ``{"state_dict": ...}`` pickle of tensors only). The weights equal
    ``build_tiny_components(family, seed)``'s; SD2's OpenCLIP text encoder gets the extra last block that loaders drop.
    Returns the checkpoint path.
    """
    import torch
    import yaml

    from sd_scripts.models.ldm_convert import ldm_config_from_diffusers, models_to_ldm

    if fmt not in ("safetensors", "ckpt"):
        raise ValueError(f"fmt must be 'safetensors' or 'ckpt', not {fmt!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if family == "sdxl":
        from sd_scripts.models.ldm_convert import sgm_config_from_diffusers

        base = tiny_tokenizer_cache_dir(path)
        dirs = (write_tiny_tokenizer(base / TOKENIZER_CACHE_NAMES["sdxl"], TINY_PAD_TOKENS["sdxl"]),
                write_tiny_tokenizer(base / TOKENIZER_CACHE_NAMES["sdxl_2"], TINY_PAD_TOKENS["sdxl_2"]))
        parts = build_tiny_components(family, seed=seed, tokenizer_dir=dirs, v_prediction=v_prediction)
        parts["tokenizer"].save_pretrained(str(dirs[0]))
        parts["tokenizer_2"].save_pretrained(str(dirs[1]))
        state = models_to_ldm(parts["unet"], parts["vae"], [parts["text_encoder"], parts["text_encoder_2"]], "sdxl")
        _save_state(path, state, fmt)
        ldm_config = sgm_config_from_diffusers(parts["unet"].config, parts["vae"].config, v_prediction)
        path.with_suffix(".yaml").write_text(yaml.safe_dump(ldm_config, sort_keys=False), encoding="utf-8")
        return path
    tok_dir = tiny_tokenizer_cache_dir(path) / TOKENIZER_CACHE_NAMES[family]
    write_tiny_tokenizer(tok_dir, pad_token=TINY_PAD_TOKENS[family])
    parts = build_tiny_components(family, seed=seed, tokenizer_dir=tok_dir, v_prediction=v_prediction)
    parts["tokenizer"].save_pretrained(str(tok_dir))
    kind = "openclip" if family == "sd2" else "clip"
    state = models_to_ldm(parts["unet"], parts["vae"], parts["text_encoder"], kind)
    _save_state(path, state, fmt)
    ldm_config = ldm_config_from_diffusers(parts["unet"].config, parts["vae"].config, kind, v_prediction)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(ldm_config, sort_keys=False), encoding="utf-8")
    return path


def _save_state(path: Path, state: dict, fmt: str) -> None:
    import torch

    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"format": "pt"})
    else:
        torch.save({"state_dict": state, "global_step": 0}, str(path))
