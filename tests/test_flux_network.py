"""LoRA, LoCon and LyCORIS networks on FLUX.1: kohya's module names and network_args (train_blocks, train_t5xxl,
per-module-type dims, split_qkv)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from sd_scripts.core.config import TrainConfig  # noqa: E402
from sd_scripts.core.errors import ConfigError  # noqa: E402
from sd_scripts.files.lora_keys import flux_lora_module_paths, lora_name  # noqa: E402
from sd_scripts.networks.factory import build_network  # noqa: E402


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


def _build(model, *args, module="networks.lora", dim=4, te=True):
    config = TrainConfig()
    config.network_module, config.network_dim, config.network_alpha = module, dim, 1.0
    config.network_args = list(args)
    built = build_network(config, model, train_unet=True, train_text_encoder=te)
    return built


def _names(built):
    return sorted(built.network.kohya_state_dict())


def test_default_lora_names_are_kohyas(flux_model):
    built = _build(flux_model)
    try:
        modules = {k.split(".")[0] for k in built.network.kohya_state_dict()}
        unet = {m for m in modules if m.startswith("lora_unet_")}
        assert unet == {lora_name("lora_unet", p) for p in flux_lora_module_paths(2, 2)}
        te = {m for m in modules if not m.startswith("lora_unet_")}
        assert te and all(m.startswith("lora_te1_text_model_encoder_layers_") for m in te)  # CLIP-L only
        assert "lora_unet_double_blocks_0_img_attn_qkv" in modules and "lora_unet_single_blocks_1_linear1" in modules
    finally:
        built.network.remove()


def test_train_blocks_t5_and_type_dims(flux_model):
    built = _build(flux_model, "train_blocks=single", "train_t5xxl=True", "single_mod_dim=0", "single_dim=8")
    try:
        state = built.network.kohya_state_dict()
        modules = {k.split(".")[0] for k in state}
        assert not any("double_blocks" in m for m in modules)
        assert not any("modulation" in m for m in modules)
        assert state["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape[0] == 8
        assert any(m.startswith("lora_te3_encoder_block_0_layer_0_SelfAttention_") for m in modules)
        assert any(m.startswith("lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0") for m in modules)
        assert any(m.startswith("lora_te1_") for m in modules)
    finally:
        built.network.remove()
    with pytest.raises(ConfigError) as e:
        _build(flux_model, "train_blocks=middle")
    assert str(e.value).startswith("network_args: train_blocks")


def test_split_qkv_trains_parts_and_saves_the_fused_delta(flux_model):
    built = _build(flux_model, "split_qkv=True", "train_blocks=all", te=False)
    network = built.network
    try:
        with torch.no_grad():
            for p in network.parameters():
                p.normal_(0, 0.1)
        lora = network.lora_by_name()["lora_unet_single_blocks_0_linear1"]
        layer = flux_model.unet.single_blocks[0].linear1
        x = torch.randn(2, 3, layer.in_features)
        with torch.no_grad():
            delta_out = layer(x) - torch.nn.functional.linear(x, layer.weight, layer.bias)
        state = network.kohya_state_dict()
        down = state["lora_unet_single_blocks_0_linear1.lora_down.weight"]
        up = state["lora_unet_single_blocks_0_linear1.lora_up.weight"]
        alpha = state["lora_unet_single_blocks_0_linear1.alpha"].item()
        assert down.shape == (4 * 4, 64) and up.shape == (3 * 64 + 256, 16)
        # a loader's reading of the fused file (alpha / file rank) gives the trained delta
        file_delta = up @ down * (alpha / down.shape[0])
        assert torch.allclose(x @ file_delta.T, delta_out, atol=1e-5)
        assert torch.allclose(lora.delta_weight(), file_delta, atol=1e-6)
        assert state["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 12
        # loading the fused file back splits it into the same parts
        again = _build(flux_model, "split_qkv=True", te=False)
        try:
            again.network.load_kohya_state_dict(state)
            reloaded = again.network.kohya_state_dict()
            assert all(torch.equal(reloaded[k], v) for k, v in state.items())
        finally:
            again.network.remove()
    finally:
        network.remove()


def test_lycoris_lokr_on_flux_modules(flux_model):
    pytest.importorskip("lycoris")
    built = _build(flux_model, "algo=lokr", "factor=4", module="lycoris.kohya", te=False)
    try:
        keys = built.network.kohya_state_dict()
        modules = {k.split(".")[0] for k in keys}
        assert "lora_unet_double_blocks_0_img_attn_qkv" in modules and "lora_unet_single_blocks_1_linear2" in modules
        assert any(k.endswith(".lokr_w1") for k in keys)
    finally:
        built.network.remove()
