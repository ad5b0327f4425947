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


# ---- kohya's train_double_block_indices / train_single_block_indices, in_dims, split_qkv with dim_from_weights

@pytest.fixture(scope="module")
def wide_model(flux_model):
    """The tiny model with 4 double and 12 single blocks, so index lists and ranges have room."""
    from dataclasses import replace

    from sd_scripts.models.flux.transformer import FluxTransformer
    from sd_scripts.testing.tiny_flux import tiny_flux_params

    torch.manual_seed(0)
    return replace(flux_model, unet=FluxTransformer(replace(tiny_flux_params(), depth=4, depth_single_blocks=12)))


def _blocks(names, kind):
    """``{block index: module count}`` of the ``kind`` (double/single) blocks among module names."""
    out: dict[int, int] = {}
    for name in names:
        if name.startswith(f"lora_unet_{kind}_blocks_"):
            index = int(name.split("_")[4])
            out[index] = out.get(index, 0) + 1
    return out


ALL_DOUBLE, ALL_SINGLE = set(range(4)), set(range(12))


@pytest.mark.parametrize("args, double, single", [
    (("train_double_block_indices=0,2-3",), {0, 2, 3}, ALL_SINGLE),
    (("train_single_block_indices=0,1,8-10, 11",), ALL_DOUBLE, {0, 1, 8, 9, 10, 11}),
    (("train_double_block_indices=none", "train_single_block_indices=all"), set(), ALL_SINGLE),
    (("train_double_block_indices=1", "train_single_block_indices="), {1}, set()),  # empty = none, as kohya
    (("train_blocks=single", "train_single_block_indices=3,5-6"), set(), {3, 5, 6}),
    (("train_blocks=double", "train_double_block_indices=ALL", "train_single_block_indices=0"), ALL_DOUBLE, set()),
], ids=["double_list", "single_ranges", "none_all", "empty", "single_only", "double_only"])
def test_block_indices_choose_which_blocks_get_lora(wide_model, args, double, single):
    built = _build(wide_model, *args, te=False)
    try:
        names = {k.split(".")[0] for k in built.network.kohya_state_dict()}
        assert _blocks(names, "double") == {i: 10 for i in double}  # every linear of a chosen block
        assert _blocks(names, "single") == {i: 3 for i in single}
        assert names <= {n for n in names if "_blocks_" in n}  # no input layers without in_dims
    finally:
        built.network.remove()


def test_block_indices_with_type_dims_and_warnings(wide_model):
    built = _build(wide_model, "train_blocks=single", "train_double_block_indices=0", "train_single_block_indices=2",
                   "single_mod_dim=0", "single_dim=8", te=False)
    try:
        state = built.network.kohya_state_dict()
        assert {k.split(".")[0] for k in state if k.endswith("lora_down.weight")} == {
            "lora_unet_single_blocks_2_linear1", "lora_unet_single_blocks_2_linear2"}
        assert state["lora_unet_single_blocks_2_linear1.lora_down.weight"].shape[0] == 8
        assert any("train_double_block_indices does nothing with train_blocks=single" in w for w in built.warnings)
    finally:
        built.network.remove()


def test_in_dims_adds_the_input_layers_in_kohyas_order(flux_model):
    built = _build(flux_model, "in_dims=[4,2,0,3,1]", "train_double_block_indices=none",
                   "train_single_block_indices=none", dim=8, te=False)
    try:
        state = built.network.kohya_state_dict()
        ranks = {k.split(".")[0]: v.shape[0] for k, v in state.items() if k.endswith("lora_down.weight")}
        assert list(ranks) == ["lora_unet_img_in", "lora_unet_time_in_in_layer", "lora_unet_time_in_out_layer",
                               "lora_unet_guidance_in_in_layer", "lora_unet_guidance_in_out_layer", "lora_unet_txt_in"]
        assert list(ranks.values()) == [4, 2, 2, 3, 3, 1]
        assert all(state[f"{n}.alpha"].item() == 1.0 for n in ranks)  # network_alpha, as kohya
        layer = flux_model.unet.txt_in
        with torch.no_grad():
            built.network.lora_by_name()["lora_unet_txt_in"].lora_up.weight.normal_()
            x = torch.randn(2, layer.in_features)
            assert not torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    finally:
        built.network.remove()
    default = _build(flux_model, "in_dims=0,0,0,0,0", te=False)  # 0 leaves a layer out
    try:
        assert not any("_in" in n.split("_blocks_")[0] for n in default.network.lora_by_name())
    finally:
        default.network.remove()


def test_in_dims_on_schnell_has_no_guidance_layer():
    from sd_scripts.models.checkpoint_io import LoadedModel
    from sd_scripts.models.families import get_family
    from sd_scripts.models.flux.transformer import FluxTransformer
    from sd_scripts.testing.tiny_flux import tiny_flux_params

    model = LoadedModel(family=get_family("flux"), unet=FluxTransformer(tiny_flux_params(dev=False)), vae=None,
                        text_encoders=[], tokenizers=[], v_parameterization=False, model_path="", options={})
    built = _build(model, "in_dims=1,1,1,1,1", te=False)
    try:
        names = set(built.network.lora_by_name())
        assert "lora_unet_vector_in_out_layer" in names and not any("guidance_in" in n for n in names)
    finally:
        built.network.remove()


@pytest.mark.parametrize("arg, words", [
    ("train_double_block_indices=0,4", ("has block 4", "4 double blocks (0-3)", "up to 3")),
    ("train_single_block_indices=12", ("has block 12", "12 single blocks (0-11)",)),
    ("train_single_block_indices=5-2", ("range 5-2", "0,1,8-12")),
    ("train_double_block_indices=first", ("'first'", "not an index")),
    ("train_double_block_indices=-1", ("not an index",)),
    ("in_dims=4,4", ("5 whole numbers", "in_dims=[4,0,0,0,4]")),
    ("in_dims=[4,0,0,0,-1]", ("5 whole numbers",)),
    ("in_dims=[4,x,0,0,1]", ("5 whole numbers",)),
    ("img_attn_dim=big", ("whole number", "img_attn_dim=8")),
    ("train_blocks=middle", ("all, single or double",)),
])
def test_bad_flux_network_args_are_one_line(wide_model, arg, words):
    key, _, value = arg.partition("=")
    with pytest.raises(ConfigError) as e:
        _build(wide_model, arg, te=False)
    message = str(e.value)
    assert message.startswith(f"network_args: {key}={value} ") and "\n" not in message, message
    assert all(w in message for w in words), message
    assert e.value.setting == "network_args"


def test_flux_network_args_are_checked_without_a_model():
    """Preflight's check: the family and detection's block counts, no torch model."""
    from sd_scripts.models.families import get_family
    from sd_scripts.networks.factory import check_network_settings

    config = TrainConfig()
    config.network_module, config.network_dim = "networks.lora", 4
    info = {"double_blocks": 19, "single_blocks": 38, "guidance_embed": False}
    config.network_args = ["train_double_block_indices=0,1,8-12,18", "train_single_block_indices=0-37",
                           "in_dims=[4,0,0,2,4]"]
    warnings = check_network_settings(config, get_family("flux"), model_info=info)
    assert any("no guidance embedding" in w for w in warnings) and not any("not used by" in w for w in warnings)
    config.network_args = ["train_single_block_indices=0-38"]
    with pytest.raises(ConfigError, match=r"^network_args: train_single_block_indices=0-38 has block 38, but the "
                                          r"model has 38 single blocks \(0-37\)"):
        check_network_settings(config, get_family("flux"), model_info=info)


def _random_file(model, tmp_path, *args, dim=4):
    from sd_scripts.files.lora_file import save_lora_file

    built = _build(model, *args, dim=dim, te=False)
    try:
        torch.manual_seed(3)
        with torch.no_grad():
            for p in built.network.parameters():
                p.normal_(0, 0.1)
        state = {k: v.clone() for k, v in built.network.kohya_state_dict().items()}
        deltas = {lora.lora_name: lora.delta_weight() for lora in built.network.loras}
    finally:
        built.network.remove()
    path = tmp_path / "net.safetensors"
    save_lora_file(path, state, {"ss_network_module": "networks.lora"})
    return path, state, deltas


def _resume(model, path, *args):
    config = TrainConfig()
    config.network_module, config.network_dim, config.network_alpha = "networks.lora", 32, 1.0
    config.network_args, config.network_weights, config.dim_from_weights = list(args), str(path), True
    return build_network(config, model, train_unet=True, train_text_encoder=False)


def test_dim_from_weights_resumes_a_split_qkv_file(flux_model, tmp_path):
    from sd_scripts.networks.lora_split import SplitLoRAModule

    path, state, deltas = _random_file(flux_model, tmp_path, "split_qkv=True", "in_dims=[2,0,0,0,2]")
    split = _resume(flux_model, path, "split_qkv=True")  # split again: each part at the trained rank
    try:
        qkv = split.network.lora_by_name()["lora_unet_double_blocks_0_img_attn_qkv"]
        linear1 = split.network.lora_by_name()["lora_unet_single_blocks_1_linear1"]
        assert isinstance(qkv, SplitLoRAModule) and qkv.lora_dim == 4 and linear1.lora_dim == 4
        assert "lora_unet_img_in" in split.network.lora_by_name()  # in_dims modules come from the file too
        again = split.network.kohya_state_dict()
        assert again.keys() == state.keys() and all(torch.equal(again[k], v) for k, v in state.items())
    finally:
        split.network.remove()
    plain = _resume(flux_model, path)  # kohya's way: one LoRA of the file's rank, the same delta
    try:
        qkv = plain.network.lora_by_name()["lora_unet_double_blocks_0_img_attn_qkv"]
        assert not isinstance(qkv, SplitLoRAModule) and qkv.lora_dim == 12
        for lora in plain.network.loras:
            torch.testing.assert_close(lora.delta_weight(), deltas[lora.lora_name], rtol=1e-5, atol=1e-6)
    finally:
        plain.network.remove()


def test_a_plain_file_is_not_read_as_split_qkv(flux_model, tmp_path):
    path, _, _ = _random_file(flux_model, tmp_path, dim=6)  # rank 6: not 3 or 4 parts of one rank
    with pytest.raises(ConfigError, match=r"^network_args: split_qkv is on, but module lora_unet_\w+ of "
                                          r"network_weights has rank 6, not a multiple of its \d parts .* turn "
                                          "split_qkv off"):
        _resume(flux_model, path, "split_qkv=True")
    path, _, _ = _random_file(flux_model, tmp_path, dim=12)  # rank 12 divides, but q, k, v are mixed
    with pytest.raises(ConfigError, match=r"^network_weights: module lora_unet_\w+ has a lora_up that mixes q, k, v"):
        _resume(flux_model, path, "split_qkv=True")


def test_dim_from_weights_takes_the_files_modules_whatever_the_args(flux_model, tmp_path):
    """As kohya's create_network_from_weights: the file's blocks and T5 modules come back with train_blocks=double
    and no train_t5xxl."""
    from sd_scripts.files.lora_file import save_lora_file

    built = _build(flux_model, "train_t5xxl=True", "train_single_block_indices=1")
    state = {k: v.clone() for k, v in built.network.kohya_state_dict().items()}
    built.network.remove()
    path = tmp_path / "t5.safetensors"
    save_lora_file(path, state, {"ss_network_module": "networks.lora"})
    config = TrainConfig()
    config.network_module, config.network_dim, config.network_alpha = "networks.lora", 32, 1.0
    config.network_args, config.network_weights, config.dim_from_weights = ["train_blocks=double"], str(path), True
    resumed = build_network(config, flux_model, train_unet=True, train_text_encoder=True)
    try:
        assert set(resumed.network.kohya_state_dict()) == set(state)
        assert any(n.startswith("lora_unet_single_blocks_1_") for n in resumed.network.lora_by_name())
        assert any(n.startswith("lora_te3_") for n in resumed.network.lora_by_name())
    finally:
        resumed.network.remove()
