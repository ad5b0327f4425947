"""A FLUX.1 LoRA file in kohya's layout, checked the way diffusers reads it: ``FluxPipeline.load_lora_weights`` (its
kohya-FLUX converter) takes every key and gives the same transformer output as merging the deltas into the BFL
weights by hand and loading those with diffusers' single-file loader; our own forward with the network agrees."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")

from sd_scripts.core.config import TrainConfig  # noqa: E402
from sd_scripts.files.lora_keys import group_by_module  # noqa: E402
from sd_scripts.models.flux.packing import image_ids, pack_latents, text_ids  # noqa: E402
from sd_scripts.networks.factory import build_network  # noqa: E402
from sd_scripts.testing.diffusers_flux import diffusers_flux_widths  # noqa: E402


def _cfg(**kw) -> TrainConfig:
    config = TrainConfig()
    for key, value in kw.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope="module")
def flux_setup(tmp_path_factory):
    from sd_scripts.models.loading import load_model
    from sd_scripts.testing.tiny_flux import save_tiny_flux_diffusers, save_tiny_flux_files

    root = tmp_path_factory.mktemp("flux_lora")
    files = save_tiny_flux_files(root / "parts")
    folder = save_tiny_flux_diffusers(root / "diffusers")
    model = load_model(_cfg(pretrained_model_name_or_path=str(files["transformer"]), clip_l=str(files["clip_l"]),
                            t5xxl=str(files["t5xxl"]), ae=str(files["ae"]),
                            tokenizer_cache_dir=str(files["tokenizer_cache_dir"])))
    return root, files, folder, model


def _save_random_lora(model, path, *args):
    from sd_scripts.files.lora_file import save_lora_file

    config = _cfg(network_module="networks.lora", network_dim=4, network_alpha=2.0, network_args=list(args))
    built = build_network(config, model, train_unet=True, train_text_encoder=True)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in built.network.parameters():
            p.normal_(0, 0.05)
    save_lora_file(path, built.network.kohya_state_dict(), {"ss_network_module": "networks.lora"})
    return built.network


def _inputs(params, batch=1, height=8, width=6, tokens=7):
    g = torch.Generator().manual_seed(3)
    return {"img": pack_latents(torch.randn(batch, 16, height, width, generator=g)),
            "img_ids": image_ids(batch, height, width), "txt": torch.randn(batch, tokens, params.context_in_dim, generator=g),
            "txt_ids": text_ids(batch, tokens), "timesteps": torch.tensor([0.7]),
            "y": torch.randn(batch, params.vec_in_dim, generator=g), "guidance": torch.tensor([3.5])}


def _diffusers_out(transformer, x):
    with torch.no_grad():
        return transformer(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                           timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                           guidance=x["guidance"], return_dict=False)[0]


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


INPUT_LAYERS = ("lora_unet_img_in", "lora_unet_time_in_", "lora_unet_vector_in_", "lora_unet_guidance_in_",
                "lora_unet_txt_in")


def _merge_by_hand(transformer_file, modules, out_path):
    """W + up @ down * alpha / rank on the BFL weights of ``modules`` (kohya module name -> its tensors)."""
    from safetensors.torch import load_file, save_file

    merged = load_file(str(transformer_file))
    for name, parts in modules.items():
        key = next(k for k in merged if k.endswith(".weight") and
                   "lora_unet_" + k[: -len(".weight")].replace(".", "_") == name)
        down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
        merged[key] = merged[key] + up @ down * (parts["alpha"].item() / down.shape[0])
    save_file(merged, str(out_path))
    return out_path


@pytest.mark.parametrize("args", [(), ("split_qkv=True",),
                                  ("in_dims=[4,2,2,2,4]", "train_double_block_indices=1",
                                   "train_single_block_indices=0")],
                         ids=["lora", "split_qkv", "in_dims_block_indices"])
def test_diffusers_loads_every_key_and_matches_the_hand_merge(flux_setup, tmp_path, args):
    """With ``in_dims`` diffusers (0.42) takes every key but drops the input layers' modules without a word: its
    kohya converter names them ``x_embedder``, ``time_text_embed.*``, ``context_embedder`` without the
    ``transformer.`` prefix its loader keeps (kohya's own in_dims files fare the same). The test pins that: diffusers'
    output is the hand merge of the block modules only, ours (and ComfyUI's and Forge's,
    tests/test_flux_client_rules.py) the merge of all of them."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from safetensors.torch import load_file

    _, files, folder, model = flux_setup
    path = tmp_path / "flux_lora.safetensors"
    network = _save_random_lora(model, path, *args)
    try:
        x = _inputs(model.unet.params)
        with torch.no_grad():
            ours = model.unet(**x)  # the network is applied to our transformer
    finally:
        network.remove()
    lora = load_file(str(path))
    parsed = group_by_module(lora)
    assert not parsed.other_keys and all(set(p) == {"lora_down.weight", "lora_up.weight", "alpha"}
                                         for p in parsed.modules.values())
    unet = {n: p for n, p in parsed.modules.items() if n.startswith("lora_unet_")}
    inputs = {n for n in unet if n.startswith(INPUT_LAYERS)}
    assert bool(inputs) == any(a.startswith("in_dims") for a in args)
    merged_path = _merge_by_hand(files["transformer"], unet, tmp_path / "merged.safetensors")
    blocks_path = _merge_by_hand(files["transformer"], {n: p for n, p in unet.items() if n not in inputs},
                                 tmp_path / "merged_blocks.safetensors")

    warnings = _Warnings()
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(warnings)
    try:
        with diffusers_flux_widths(model.unet.params.hidden_size, model.unet.params.mlp_hidden_dim):
            by_hand, by_hand_blocks = (FluxTransformer2DModel.from_single_file(
                str(p), config=str(folder), subfolder="transformer", local_files_only=True)
                for p in (merged_path, blocks_path))
            pipe = FluxPipeline.from_pretrained(str(folder))
            converted = pipe.lora_state_dict(str(path))
            converted = converted[0] if isinstance(converted, tuple) else converted
            pipe.load_lora_weights(str(path))
    finally:
        diffusers_logger.removeHandler(warnings)
    assert not [m for m in warnings.messages if "key" in m.lower() or "unsupported" in m.lower()], warnings.messages
    n_te = sum(1 for n in parsed.modules if n.startswith("lora_te1_"))
    transformer_keys = [k for k in converted if k.startswith("transformer.")]
    te_keys = [k for k in converted if k.startswith("text_encoder.")]
    unprefixed = [k for k in converted if not k.startswith(("transformer.", "text_encoder."))]
    expanded = len(unet) - len(inputs) + sum(2 if n.endswith("_qkv") else 3 if n.endswith("_linear1") else 0
                                             for n in unet)  # q/k/v (+ MLP) are separate modules in diffusers
    assert len(transformer_keys) == 2 * expanded and len(te_keys) == 2 * n_te > 0
    assert len(unprefixed) == 2 * len(inputs)
    expected = _diffusers_out(by_hand, x)
    got = _diffusers_out(pipe.transformer, x)
    assert (expected - _diffusers_out(FluxTransformer2DModel.from_pretrained(str(folder / "transformer")), x)).abs().max() > 1e-3
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    if inputs:
        assert (got - expected).abs().max() > 1e-3
        expected = _diffusers_out(by_hand_blocks, x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
