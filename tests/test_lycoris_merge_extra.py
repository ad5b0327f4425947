"""DoRA (on LoCon, LoHa, LoKr), GLoRA, diagonal OFT and BOFT networks merged into a single-file checkpoint
and through base_weights: each merged weight equals what lycoris-lora computes for the same module; what
still cannot be merged is refused in one line, and nothing is written."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd_scripts.core.errors import ConfigError
from sd_scripts.files.lora_file import save_lora_file
from sd_scripts.networks import lycoris_adapter as la
from sd_scripts.networks.ldm_lora_map import build_lora_map
from sd_scripts.files.lora_keys import lora_name_spellings
from sd_scripts.networks.lycoris_merge import merge_networks_into_checkpoint_file
from sd_scripts.networks.network_args import split_network_args
from tests.helpers import make_dataset, tiny_config

# case -> network_args (network_dim 4, network_alpha 2: alpha/r = 0.5)
CASES = {
    "dora": ["algo=lora", "dora_wd=true", "conv_dim=4", "conv_alpha=2"],
    "dora-on-input": ["algo=lora", "dora_wd=true", "wd_on_output=false", "conv_dim=4", "conv_alpha=2"],
    "doha": ["algo=loha", "dora_wd=true", "conv_dim=4", "conv_alpha=2"],
    "dokr": ["algo=lokr", "dora_wd=true", "factor=4", "decompose_both=true", "conv_dim=4", "conv_alpha=2"],
    "glora": ["algo=glora"],
    "diag-oft": ["algo=diag-oft", "constraint=0.01", "rescaled=true", "conv_dim=4"],
    "boft": ["algo=boft", "rescaled=true", "conv_dim=4"],
}


def _network(args, seed: int = 0):
    """A LyCORIS network applied to the tiny SD1 model (the weights of ``tiny_sd1_single_file``), every trained
    tensor perturbed so that each module changes its weight (``dora_scale`` and ``rescale`` by up to ~10 %)."""
    from sd_scripts.testing.tiny_models import build_tiny_components

    parts = build_tiny_components("sd1", seed=0)
    parsed = la.parse_lycoris_args(split_network_args(args), network_dim=4, network_alpha=2.0)
    net, _ = la.create_lycoris_network(parts["unet"], [parts["text_encoder"]], parsed, network_dim=4,
                                       network_alpha=2.0)
    net.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.loras:
            for name, p in module.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                if name in ("dora_scale", "rescale"):
                    p.mul_(1 + 0.1 * noise)
                else:
                    p.add_(0.1 * noise)
    return net


def _reference(module, ratio: float) -> torch.Tensor:
    """LyCORIS's merged weight of ``module`` at multiplier ``ratio``. For DoHa/DoKr it is the forward's
    (``get_weight`` once scaled): their ``get_merged_weight`` applies alpha/r twice (reference D.3)."""
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    with torch.no_grad():
        if getattr(module, "wd", False) and isinstance(module, (LohaModule, LokrModule)):
            weight = module.org_weight.float() + module.get_weight(module.shape) * module.scalar
            return module.apply_weight_decompose(weight, ratio)
        return module.get_merged_weight(multiplier=ratio)[0]


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    """case -> (network, its file), built once."""
    folder = tmp_path_factory.mktemp("extra_nets")
    made = {}

    def get(case):
        if case not in made:
            net = _network(CASES[case])
            path = folder / f"{case}.safetensors"
            save_lora_file(path, net.kohya_state_dict(), {"ss_network_module": "lycoris.kohya"})
            made[case] = (net, path)
        return made[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_merged_checkpoint_equals_lycoris_merged_weight(case, networks, tiny_sd1_single_file, tmp_path):
    net, path = networks(case)
    base = load_file(str(tiny_sd1_single_file))
    lora_map = build_lora_map({k: tuple(v.shape) for k, v in base.items()})
    names = net.file_names()
    part = {"dora": "dora_scale", "dora-on-input": "dora_scale", "doha": "dora_scale", "dokr": "dora_scale",
            "glora": "a1.weight", "diag-oft": "oft_blocks", "boft": "oft_blocks"}[case]
    assert any(k.endswith(f".{part}") for k in load_file(str(path)))
    for ratio in (1.0, 0.5):
        out = tmp_path / f"merged_{ratio}.safetensors"
        report = merge_networks_into_checkpoint_file(tiny_sd1_single_file, [path], [ratio], out)
        assert report.merged[str(path)] == len(net.loras) and report.unmatched[str(path)] == []
        merged = load_file(str(out))
        assert merged.keys() == base.keys()
        for module in net.loras:
            target = next(lora_map[s] for s in lora_name_spellings(names[module.lora_name]) if s in lora_map)
            rows = slice(*target.rows) if target.rows is not None else slice(None)
            got = merged[target.weight_key][rows]
            want = _reference(module, ratio).reshape(got.shape)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{case} x {ratio}: {module.lora_name}")
            assert not torch.allclose(got, base[target.weight_key][rows], atol=1e-4), module.lora_name


def test_dora_scale_axis_is_read_from_its_shape():
    from sd_scripts.networks import lora_math as lm

    w = torch.randn(6, 4, 3, 3)
    rows = torch.rand(6, 1, 1, 1) + 0.5
    cols = torch.rand(1, 4, 1, 1) + 0.5
    per_row = lm.dora_weight(w, rows)
    torch.testing.assert_close(per_row.reshape(6, -1).norm(dim=1), rows.reshape(-1), rtol=1e-5, atol=1e-6)
    per_col = lm.dora_weight(w, cols)
    torch.testing.assert_close(per_col.transpose(0, 1).reshape(4, -1).norm(dim=1), cols.reshape(-1),
                               rtol=1e-5, atol=1e-6)
    # multiplier 0 keeps W + delta; a linear (out, 1) scale fits a 1x1 conv weight
    torch.testing.assert_close(lm.dora_weight(w, rows, 0.0), w)
    lin = torch.randn(6, 4)
    torch.testing.assert_close(lm.dora_weight(lin.reshape(6, 4, 1, 1), rows.reshape(6, 1)).reshape(6, 4),
                               lm.dora_weight(lin, rows.reshape(6, 1)))


def test_base_weights_merge_a_dora_file_like_the_applied_network(tmp_path):
    from types import SimpleNamespace

    from sd_scripts.testing.tiny_models import build_tiny_components
    from sd_scripts.networks.base_weights import merge_state_dict_into_model

    net = _network(CASES["dora"], seed=3)
    net.set_multiplier(0.5)
    net.eval()
    file = net.kohya_state_dict()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)

    def outputs(unet, te):
        ids = torch.randint(0, te.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            states = te(ids)[0]
            return states, unet(latents, torch.tensor([500]), encoder_hidden_states=states).sample

    unet, te = net._unet, net._te_arg
    want_states, want = outputs(unet, te)
    fresh = build_tiny_components("sd1", seed=0)
    family = SimpleNamespace(te_lora_prefixes=("lora_te",))
    model = SimpleNamespace(family=family, unet=fresh["unet"], text_encoders=[fresh["text_encoder"]])
    merged, unmatched = merge_state_dict_into_model(model, file, 0.5)
    assert merged == len(net.loras) and not unmatched
    got_states, got = outputs(model.unet, model.text_encoders[0])
    torch.testing.assert_close(got_states, want_states, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_training_with_a_dora_file_as_base_weights(networks, tiny_sd1_diffusers, tmp_path):
    from sd_scripts.training.loop import train

    _, path = networks("dora")
    messages = []

    class Messages:
        def on_message(self, text):
            messages.append(text)

    data = make_dataset(tmp_path / "data", count=1)
    result = train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "out", base_weights=[str(path)],
                               base_weights_multiplier=[0.5], max_train_steps=1), Messages())
    assert any("base_weights: merged dora.safetensors x 0.5" in m and "match no layer" not in m for m in messages)
    assert load_file(result.output_path)


Q_NAME = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.mark.parametrize("network,metadata,match", [
    ({f"{Q_NAME}.oft_diag": torch.zeros(4, 8, 8)}, {}, "OFT \\(LyCORIS 2.0\\)"),
    ({f"{Q_NAME}.lambda_layer": torch.zeros(1, 4), f"{Q_NAME}.q_layer.weight": torch.zeros(4, 32)}, {}, "T-LoRA"),
    ({f"{Q_NAME}.a1.weight": torch.zeros(32, 2), f"{Q_NAME}.a2.weight": torch.zeros(2, 32),
      f"{Q_NAME}.b1.weight": torch.zeros(32, 2), f"{Q_NAME}.b2.weight": torch.zeros(2, 32),
      f"{Q_NAME}.bm.weight": torch.zeros(2, 2)}, {}, "Tucker GLoRA"),
    ({f"{Q_NAME}.oft_blocks": torch.zeros(4, 8, 8), f"{Q_NAME}.alpha": torch.tensor(1.0)},
     {"ss_network_module": "networks.oft"}, "kohya's own OFT"),
    ({f"{Q_NAME}.rescale": torch.ones(32, 1)}, {}, "rescale without oft_blocks"),
])
def test_leftovers_are_refused_in_one_line(network, metadata, match, tiny_sd1_single_file, tmp_path):
    path = tmp_path / "n.safetensors"
    save_file(network, str(path), metadata)
    out = tmp_path / "o.safetensors"
    with pytest.raises(ConfigError, match=match) as e:
        merge_networks_into_checkpoint_file(tiny_sd1_single_file, [path], [1.0], out)
    assert "\n" not in str(e.value) and not out.exists()


def test_lora_to_lora_tools_still_refuse_dora(networks, tmp_path):
    from sd_scripts.networks.resize import resize_lora_file

    _, path = networks("dora")
    with pytest.raises(ConfigError, match="DoRA.*merge it into a checkpoint") as e:
        resize_lora_file(path, tmp_path / "r.safetensors", new_rank=2)
    assert "\n" not in str(e.value) and not (tmp_path / "r.safetensors").exists()


def test_base_weights_refuse_kohya_oft_by_its_metadata():
    from sd_scripts.networks.base_weights import merge_state_dict_into_model

    file = {f"{Q_NAME}.oft_blocks": torch.zeros(4, 8, 8), f"{Q_NAME}.alpha": torch.tensor(1.0)}
    with pytest.raises(ConfigError, match="base_weights: .*kohya's own OFT") as e:
        merge_state_dict_into_model(None, file, 1.0, metadata={"ss_network_module": "networks.oft"})
    assert "\n" not in str(e.value)
