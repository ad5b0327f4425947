"""Our FLUX.1 LoRA files (LoRA with CLIP-L and T5, split_qkv, per-type dims, in_dims and block indices; LyCORIS LoCon, LoHa and LoKr) load
completely under ComfyUI's and Forge's FLUX key rules (``tests/comfy_rules.py``, ``tests/forge_rules.py``, written
from their source): every key of the file is taken (none left for the "lora key not loaded" warning or Forge's
remaining dict), and every module's delta has the shape of the weight it lands on."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from sd_scripts.core.config import TrainConfig  # noqa: E402
from sd_scripts.networks.factory import build_network  # noqa: E402
from tests.comfy_rules import comfy_key_map_flux, comfy_load_lora, hf_text_encoder_shapes  # noqa: E402
from tests.forge_rules import forge_key_map_flux, forge_load_lora  # noqa: E402


@pytest.fixture(scope="module")
def flux_model():
    from sd_scripts.models.checkpoint_io import LoadedModel
    from sd_scripts.models.families import get_family
    from sd_scripts.testing.tiny_flux import build_tiny_flux

    parts = build_tiny_flux()
    family = get_family("flux")
    return LoadedModel(family=family, unet=parts["transformer"], vae=parts["vae"],
                       text_encoders=[parts["text_encoder"], parts["text_encoder_2"]],
                       tokenizers=[parts["tokenizer"], parts["tokenizer_2"]], v_parameterization=False,
                       model_path="", options=family.training_options(TrainConfig()))


def _file_state(model, module, *args, te=True):
    config = TrainConfig()
    config.network_module, config.network_dim, config.network_alpha = module, 4, 2.0
    config.network_args = list(args)
    built = build_network(config, model, train_unet=True, train_text_encoder=te)
    try:
        torch.manual_seed(5)
        with torch.no_grad():
            for p in built.network.parameters():
                p.normal_(0, 0.05)
        return {k: v.detach().clone() for k, v in built.network.kohya_state_dict().items()}
    finally:
        built.network.remove()


def _shapes(model):
    transformer = {k: tuple(v.shape) for k, v in model.unet.state_dict().items()}
    clip_l = hf_text_encoder_shapes(model.text_encoders[0])
    t5 = {k: tuple(v.shape) for k, v in model.text_encoders[1].state_dict().items()}
    return transformer, clip_l, t5


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


FILES = {
    "lora": ("networks.lora", ("train_t5xxl=True",)),
    "lora_split_qkv_type_dims": ("networks.lora", ("split_qkv=True", "img_attn_dim=8", "single_mod_dim=2")),
    "lora_in_dims_block_indices": ("networks.lora", ("in_dims=[4,2,2,2,4]", "train_double_block_indices=1",
                                                     "train_single_block_indices=0", "split_qkv=True")),
    "locon": ("lycoris.kohya", ("algo=locon",)),
    "loha": ("lycoris.kohya", ("algo=loha",)),
    "lokr": ("lycoris.kohya", ("algo=lokr", "factor=4")),
}


@pytest.mark.parametrize("kind", list(FILES))
def test_every_key_of_our_flux_files_maps_in_comfyui_and_forge(flux_model, kind):
    module, args = FILES[kind]
    if module.startswith("lycoris"):
        pytest.importorskip("lycoris")
    state = _file_state(flux_model, module, *args, te=not module.startswith("lycoris"))
    names = {k.split(".")[0] for k in state}
    assert any(n.startswith("lora_unet_double_blocks_") for n in names)
    assert any(n.startswith("lora_unet_single_blocks_") for n in names)
    if kind == "lora":
        assert any(n.startswith("lora_te1_") for n in names) and any(n.startswith("lora_te3_") for n in names)
    if kind == "lora_in_dims_block_indices":
        assert {"lora_unet_img_in", "lora_unet_time_in_out_layer", "lora_unet_guidance_in_in_layer",
                "lora_unet_vector_in_in_layer", "lora_unet_txt_in"} <= names
    transformer, clip_l, t5 = _shapes(flux_model)
    for client, key_map, load in (("ComfyUI", comfy_key_map_flux(transformer, clip_l, t5), comfy_load_lora),
                                  ("Forge", forge_key_map_flux(transformer, clip_l, t5), forge_load_lora)):
        deltas, left = load(state, key_map)
        assert left == [], f"{client} does not take {left[:3]}"
        assert set(deltas) == names, f"{client} does not place {sorted(names - set(deltas))[:3]}"
        for name, shape in deltas.items():
            target = key_map[name]
            assert shape[0] == target[0] and _numel(shape) == _numel(target), (client, name, shape, target)
