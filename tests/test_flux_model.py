"""The FLUX.1 transformer in BFL's layout against diffusers' FluxTransformer2DModel, its key conversions, latent
packing, and the tiny FLUX model's files."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from sd_scripts.files.lora_keys import flux_lora_module_paths, lora_name, canonical_lora_name  # noqa: E402
from sd_scripts.models.flux.diffusers_keys import bfl_to_diffusers, diffusers_to_bfl  # noqa: E402
from sd_scripts.models.flux.packing import image_ids, pack_latents, text_ids, unpack_latents  # noqa: E402
from sd_scripts.models.flux.transformer import (  # noqa: E402
    FLUX_DEV_PARAMS,
    FluxTransformer,
    axes_dim_for,
    params_from_state_dict,
    strip_bfl_prefix,
)
from sd_scripts.testing.diffusers_flux import diffusers_flux_widths  # noqa: E402
from sd_scripts.testing.tiny_flux import tiny_flux_params  # noqa: E402


def _tiny(dev=True, seed=0):
    torch.manual_seed(seed)
    model = FluxTransformer(tiny_flux_params(dev))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


def _diffusers_model(params):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        in_channels=params.in_channels, num_layers=params.depth, num_single_layers=params.depth_single_blocks,
        attention_head_dim=params.head_dim, num_attention_heads=params.num_heads,
        joint_attention_dim=params.context_in_dim, pooled_projection_dim=params.vec_in_dim,
        guidance_embeds=params.guidance_embed, axes_dims_rope=tuple(params.axes_dim)).eval()


def _inputs(params, batch=2, height=8, width=6, tokens=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, params.in_channels // 4, height, width, generator=g)
    return {
        "img": pack_latents(latents),
        "img_ids": image_ids(batch, height, width),
        "txt": torch.randn(batch, tokens, params.context_in_dim, generator=g),
        "txt_ids": text_ids(batch, tokens),
        "timesteps": torch.rand(batch, generator=g),
        "y": torch.randn(batch, params.vec_in_dim, generator=g),
        "guidance": torch.full((batch,), 3.5) if params.guidance_embed else None,
    }


def _diffusers_call(model, x):
    return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                 timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], guidance=x["guidance"],
                 return_dict=False)[0]


@pytest.mark.parametrize("dev", [True, False], ids=["dev", "schnell"])
def test_same_output_as_diffusers_through_diffusers_converter(dev):
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    ours = _tiny(dev)
    params = ours.params
    with diffusers_flux_widths(params.hidden_size, params.mlp_hidden_dim):
        convert = SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]["checkpoint_mapping_fn"]
        prefixed = {"model.diffusion_model." + k: v.clone() for k, v in ours.state_dict().items()}
        converted = convert(prefixed)
    theirs = _diffusers_model(params)
    theirs.load_state_dict(converted, strict=True)
    x = _inputs(params)
    with torch.no_grad():
        expected = _diffusers_call(theirs, x)
        got = ours(**x)
    assert got.shape == expected.shape == x["img"].shape
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_our_conversion_matches_diffusers_and_round_trips():
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    ours = _tiny()
    state = ours.state_dict()
    mine = bfl_to_diffusers(state)
    with diffusers_flux_widths(ours.params.hidden_size, ours.params.mlp_hidden_dim):
        from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

        theirs = SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]["checkpoint_mapping_fn"](dict(state))
    assert convert_flux_transformer_checkpoint_to_diffusers is not None  # the unpatched function is still there
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    back = diffusers_to_bfl(mine)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_module_names_are_bfl_checkpoint_names():
    model = FluxTransformer(tiny_flux_params(dev=True))
    names = set(model.state_dict())
    for key in ("img_in.weight", "time_in.in_layer.weight", "vector_in.out_layer.bias", "guidance_in.in_layer.weight",
                "txt_in.weight", "double_blocks.1.img_attn.qkv.weight", "double_blocks.0.txt_attn.norm.key_norm.scale",
                "double_blocks.0.img_mod.lin.weight", "double_blocks.0.txt_mlp.2.bias", "single_blocks.1.linear1.weight",
                "single_blocks.0.linear2.bias", "single_blocks.0.modulation.lin.weight",
                "single_blocks.0.norm.query_norm.scale", "final_layer.adaLN_modulation.1.weight",
                "final_layer.linear.weight"):
        assert key in names, key
    assert "guidance_in.in_layer.weight" not in FluxTransformer(tiny_flux_params(dev=False)).state_dict()
    assert model.blocks == [*model.double_blocks, *model.single_blocks]
    assert len(model.blocks) == 4


def test_params_from_state_dict_and_prefix():
    model = _tiny()
    prefixed = {"model.diffusion_model." + k: v for k, v in model.state_dict().items()}
    prefixed["vae.encoder.conv_in.weight"] = torch.zeros(1)  # an all-in-one file's other parts are left out
    state = strip_bfl_prefix(prefixed)
    assert set(state) == set(model.state_dict())
    assert params_from_state_dict(state) == model.params
    assert params_from_state_dict({k: tuple(v.shape) for k, v in state.items()}) == model.params
    assert axes_dim_for(128) == (16, 56, 56) == FLUX_DEV_PARAMS.axes_dim


def test_full_size_layout_on_meta_device():
    with torch.device("meta"):
        model = FluxTransformer(FLUX_DEV_PARAMS)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["single_blocks.37.linear1.weight"] == (3 * 3072 + 12288, 3072)
    assert shapes["double_blocks.18.img_attn.qkv.weight"] == (3 * 3072, 3072)
    assert params_from_state_dict(shapes) == FLUX_DEV_PARAMS
    count = sum(v.numel() for v in model.state_dict().values())
    assert 11.8e9 < count < 12.0e9  # FLUX.1 dev: 11.9 B parameters


def test_text_mask_hides_padding_and_checkpointing_is_exact():
    model = _tiny()
    params = model.params
    x = _inputs(params, tokens=6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    with torch.no_grad():
        masked = model(**x, txt_attention_mask=mask)
        changed = dict(x, txt=x["txt"].clone())
        changed["txt"][0, 4] += 5.0  # a padded token of sample 0
        assert torch.allclose(model(**changed, txt_attention_mask=mask)[0], masked[0], atol=1e-6)
        assert not torch.allclose(model(**changed)[0], model(**x)[0], atol=1e-4)
    model.train()
    plain = model(**x).square().mean()
    plain.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    again = model(**x).square().mean()
    again.backward()
    assert torch.equal(plain.detach(), again.detach())
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(grads, model.parameters()))


def test_packing_round_trip_and_ids():
    latents = torch.randn(2, 16, 6, 10)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 15, 64)
    assert torch.equal(tokens[0, 0], latents[0, :, 0:2, 0:2].reshape(-1))  # features ordered (c, ph, pw)
    assert torch.equal(unpack_latents(tokens, 6, 10), latents)
    ids = image_ids(2, 6, 10)
    assert ids.shape == (2, 15, 3) and ids[0, 6].tolist() == [0.0, 1.0, 1.0]


def test_kohya_flux_lora_names():
    assert lora_name("lora_unet", "double_blocks.0.img_attn.qkv") == "lora_unet_double_blocks_0_img_attn_qkv"
    assert lora_name("lora_unet", "single_blocks.0.linear1") == "lora_unet_single_blocks_0_linear1"
    assert lora_name("lora_te1", "text_model.encoder.layers.0.self_attn.q_proj") == \
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    # T5's paths start with "encoder" too, but they are not CLIP paths: no text_model is added
    assert lora_name("lora_te3", "encoder.block.0.layer.0.SelfAttention.q") == \
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    assert canonical_lora_name("lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0") == \
        "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0"
    paths = flux_lora_module_paths(19, 38)
    assert len(paths) == 19 * 10 + 38 * 3
    assert flux_lora_module_paths(2, 2, "single") == [f"single_blocks.{i}.{t}" for i in range(2)
                                                      for t in ("linear1", "linear2", "modulation.lin")]
    model = FluxTransformer(tiny_flux_params())
    modules = dict(model.named_modules())
    assert all(isinstance(modules[p], torch.nn.Linear) for p in flux_lora_module_paths(2, 2))


def test_tiny_flux_files_have_the_downloaded_layouts(tmp_path):
    from safetensors import safe_open

    from sd_scripts.testing.tiny_flux import save_tiny_flux_all_in_one, save_tiny_flux_diffusers, save_tiny_flux_files

    files = save_tiny_flux_files(tmp_path / "parts")
    keys = {name: set(safe_open(str(files[name]), "pt").keys()) for name in ("transformer", "clip_l", "t5xxl", "ae")}
    assert "double_blocks.0.img_attn.qkv.weight" in keys["transformer"] and "guidance_in.in_layer.weight" in keys["transformer"]
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in keys["clip_l"]
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in keys["t5xxl"] and "shared.weight" in keys["t5xxl"]
    assert {"encoder.conv_in.weight", "decoder.conv_out.weight", "encoder.mid.attn_1.q.weight"} <= keys["ae"]
    assert not any("quant_conv" in k for k in keys["ae"])
    assert (files["tokenizer_cache_dir"] / "google_t5-v1_1-xxl" / "tokenizer.json").is_file()
    aio = save_tiny_flux_all_in_one(tmp_path / "aio" / "flux-aio.safetensors", dev=False)
    heads = {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("text_encoders") else "")
             for k in safe_open(str(aio), "pt").keys()}
    assert heads == {"model", "text_encoders.clip_l", "text_encoders.t5xxl", "vae"}
    folder = save_tiny_flux_diffusers(tmp_path / "diffusers")
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(str(folder / "transformer"))
    ours = FluxTransformer(tiny_flux_params())
    from safetensors.torch import load_file

    ours.load_state_dict(load_file(str(files["transformer"])), strict=True)
    assert all(torch.equal(v, diffusers_to_bfl(transformer.state_dict())[k]) for k, v in ours.state_dict().items())
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"))
    assert vae.config.latent_channels == 16 and vae.config.scaling_factor == 0.3611 and vae.config.shift_factor == 0.1159
