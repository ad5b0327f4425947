"""The memory savers on the FLUX.1 transformer: kohya's blocks_to_swap count, fp8_base on the block linears, gradient
checkpointing with cpu_offload_checkpointing, together, with LoRA modules on every block linear.

On the CPU the swapped blocks wait in NaN-poisoned copies (``tests.test_block_swap.PoisonedSwap``), so the results
equal the unswapped model's bit for bit only if every block was brought in whenever it ran (forward, recomputation,
backward). The ``gpu`` tests run the same on CUDA (side-stream copies, pinned memory) and check that swapping lowers
the peak memory."""

from __future__ import annotations

import copy

import pytest
import torch

from sd_scripts.models.flux import memory
from sd_scripts.models.flux.memory import (flux_swap_counts, flux_swap_indices, max_blocks_to_swap,
                                           prepare_flux_transformer, store_flux_weights_fp8)
from sd_scripts.models.flux.transformer import FluxParams, FluxTransformer
from sd_scripts.models.fp8 import FP8_DTYPE, Fp8Linear
from tests.test_block_swap import PoisonedSwap

PARAMS = FluxParams(in_channels=16, out_channels=16, vec_in_dim=16, context_in_dim=8, hidden_size=32, num_heads=2,
                    depth=3, depth_single_blocks=5, axes_dim=(4, 6, 6), guidance_embed=True)


def test_kohya_blocks_to_swap_counts_and_which_blocks():
    assert flux_swap_counts(16) == (8, 16) and flux_swap_counts(35) == (17, 36) and flux_swap_counts(1) == (0, 2)
    assert max_blocks_to_swap(19, 38) == 36  # kohya stops at 35 (it keeps two blocks of each kind)
    indices = flux_swap_indices(19, 38, 16)
    assert indices == list(range(1, 9)) + list(range(19, 35))  # never the first or the last block
    assert max_blocks_to_swap(3, 5) == 4 and flux_swap_indices(3, 5, 4) == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="at most 4"):
        flux_swap_indices(3, 5, 5)


def _model(seed=0):
    torch.manual_seed(seed)
    model = FluxTransformer(PARAMS)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.requires_grad_(False)
    return model


def _attach_lora(model):
    from sd_scripts.networks.lora import LoRAModule

    loras = torch.nn.ModuleList()
    torch.manual_seed(1)
    for i, block in enumerate(model.blocks):
        for name, layer in block.named_modules():
            if isinstance(layer, torch.nn.Linear):
                lora = LoRAModule(f"lora_{i}_{name}", layer, lora_dim=2, alpha=1.0)
                torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
                lora.apply_to()
                loras.append(lora)
    return loras


def _inputs(device="cpu", batch=2, seed=3):
    from sd_scripts.models.flux.packing import image_ids, text_ids

    g = torch.Generator().manual_seed(seed)
    h, w, tokens = 4, 6, 5
    x = {
        "img": torch.randn(batch, h * w, PARAMS.in_channels, generator=g),
        "img_ids": image_ids(batch, 2 * h, 2 * w),
        "txt": torch.randn(batch, tokens, PARAMS.context_in_dim, generator=g),
        "txt_ids": text_ids(batch, tokens),
        "timesteps": torch.rand(batch, generator=g),
        "y": torch.randn(batch, PARAMS.vec_in_dim, generator=g),
        "guidance": torch.full((batch,), 3.5),
    }
    return {k: v.to(device) for k, v in x.items()}


def _step(model, loras, inputs):
    loss = model(**inputs).float().square().mean()
    loss.backward()
    grads = [p.grad.detach().clone() for p in loras.parameters() if p.grad is not None]
    loras.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _same(a, b):
    assert torch.isfinite(a[0]) and torch.equal(a[0], b[0])
    assert len(a[1]) == len(b[1]) > 0 and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def test_fp8_base_stores_the_block_linears_in_float8_before_the_lora():
    model = _model()
    count = store_flux_weights_fp8(model)
    assert count == sum(isinstance(m, Fp8Linear) for m in model.modules()) == 3 * 10 + 5 * 3
    assert model.img_in.weight.dtype == torch.float32 and model.final_layer.linear.weight.dtype == torch.float32
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == FP8_DTYPE
    assert model.double_blocks[0].img_attn.norm.query_norm.scale.dtype == torch.float32
    loras = _attach_lora(model)
    loss, grads = _step(model, loras, _inputs())
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("checkpointing", ["off", "on", "cpu_offload"])
def test_block_swap_on_flux_changes_nothing(monkeypatch, fp8, checkpointing):
    model = _model()
    if fp8:
        store_flux_weights_fp8(model)
    loras = _attach_lora(model)
    model.train()
    reference = _step(model, loras, _inputs())
    monkeypatch.setattr(memory, "BlockSwap", PoisonedSwap)
    swap = prepare_flux_transformer(model, "cpu", blocks_to_swap=3, gradient_checkpointing=checkpointing != "off",
                                    cpu_offload_checkpointing=checkpointing == "cpu_offload")
    assert isinstance(swap, PoisonedSwap) and swap.swapped == [1, 3, 4, 5, 6]
    swap.trace = []
    for _ in range(2):
        _same(reference, _step(model, loras, _inputs()))
        assert swap.on_device() == []
    assert [i for what, i in swap.trace if what == "in"] == (swap.swapped + swap.swapped[::-1]) * 2
    assert swap.max_on_device <= 2
    with torch.no_grad():  # sampling after training
        model.eval()
        out = model(**_inputs())
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------------------ GPU

def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.mark.gpu
def test_gpu_fp8_base_and_block_swap_match_and_lower_the_peak():
    """On CUDA with bf16 autocast: block swap (side-stream copies from pinned memory) gives the same loss and LoRA
    gradients as the transformer held whole on the GPU, and a lower peak; fp8 storage lowers it further."""
    _cuda_or_skip()
    params = FluxParams(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=64, hidden_size=512,
                        num_heads=4, depth=6, depth_single_blocks=12, axes_dim=(16, 56, 56), guidance_embed=True)
    torch.manual_seed(0)
    base = FluxTransformer(params).to(torch.bfloat16).requires_grad_(False)
    device = torch.device("cuda")

    def run(blocks_to_swap, fp8):
        model = copy.deepcopy(base)
        if fp8:
            store_flux_weights_fp8(model)
        loras = _attach_lora(model).to(device)
        model.train()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        swap = prepare_flux_transformer(model, device, blocks_to_swap=blocks_to_swap, gradient_checkpointing=True)
        g = torch.Generator().manual_seed(3)
        x = {"img": torch.randn(1, 256, 64, generator=g), "txt": torch.randn(1, 32, 64, generator=g),
             "y": torch.randn(1, 64, generator=g)}
        from sd_scripts.models.flux.packing import image_ids, text_ids

        inputs = {"img": x["img"].to(device), "img_ids": image_ids(1, 32, 32).to(device), "txt": x["txt"].to(device),
                  "txt_ids": text_ids(1, 32).to(device), "timesteps": torch.full((1,), 0.5, device=device),
                  "y": x["y"].to(device), "guidance": torch.full((1,), 3.5, device=device)}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**inputs).float().square().mean()
        loss.backward()
        torch.cuda.synchronize()
        grads = [p.grad.float().cpu() for p in loras.parameters() if p.grad is not None]
        peak = torch.cuda.max_memory_allocated()
        if swap is not None:
            assert swap.on_device() == []
        return loss.item(), grads, peak

    whole = run(0, False)
    swapped = run(8, False)
    assert whole[0] == swapped[0]
    assert all(torch.equal(a, b) for a, b in zip(whole[1], swapped[1]))
    assert swapped[2] < whole[2] * 0.8, (swapped[2], whole[2])
    fp8 = run(0, True)
    assert fp8[2] < whole[2] * 0.75 and abs(fp8[0] - whole[0]) < 0.1 * abs(whole[0]) + 1e-3
    fp8_swapped = run(8, True)
    assert fp8_swapped[0] == fp8[0] and fp8_swapped[2] < fp8[2]


def test_fp8_base_loads_the_block_linears_straight_into_float8(tiny_flux_files):
    from sd_scripts.core.config import TrainConfig
    from sd_scripts.models.loading import load_model

    def load(**kw):
        config = TrainConfig(pretrained_model_name_or_path=str(tiny_flux_files["transformer"]),
                             clip_l=str(tiny_flux_files["clip_l"]), t5xxl=str(tiny_flux_files["t5xxl"]),
                             ae=str(tiny_flux_files["ae"]), tokenizer_cache_dir=str(tiny_flux_files["tokenizer_cache_dir"]),
                             **kw)
        return load_model(config, dtype=torch.bfloat16).unet

    plain, fp8 = load(), load(fp8_base=True)
    layers = [m for m in fp8.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 2 * 10 + 2 * 3 and all(m.weight.dtype == FP8_DTYPE for m in layers)
    assert fp8.img_in.weight.dtype == torch.bfloat16 and fp8.double_blocks[0].img_attn.qkv.bias.dtype == torch.bfloat16
    from safetensors.torch import load_file

    source = load_file(str(tiny_flux_files["transformer"]))
    for name, b in fp8.state_dict().items():  # each weight rounded once, from the file's values
        assert torch.equal(source[name].to(b.dtype).float(), b.float()), name
        assert torch.equal(plain.state_dict()[name], source[name].to(torch.bfloat16))


def test_memory_settings_are_checked_before_the_model_loads():
    from sd_scripts.core.config import TrainConfig
    from sd_scripts.models.families import get_family
    from sd_scripts.models.memory_settings import memory_setting_problems

    flux, sdxl = get_family("flux"), get_family("sdxl")
    full = {"double_blocks": 19, "single_blocks": 38}

    def problems(family, info=None, **kw):
        errors, _ = memory_setting_problems(TrainConfig(**kw), family, info)
        return [(e.setting, str(e)) for e in errors]

    assert problems(flux, full, blocks_to_swap=16, gradient_checkpointing=True, cpu_offload_checkpointing=True) == []
    assert problems(flux, full, blocks_to_swap=37)[0][1] == ("blocks_to_swap: 37 is more than this model's 19 + 38 "
                                                             "blocks allow; give at most 36")
    assert problems(flux, {"double_blocks": 3, "single_blocks": 5}, blocks_to_swap=5)[0][0] == "blocks_to_swap"
    assert problems(sdxl, blocks_to_swap=4)[0][1].startswith("blocks_to_swap: only FLUX.1 transformers swap blocks")
    assert [s for s, _ in problems(sdxl, cpu_offload_checkpointing=True, gradient_checkpointing=True)] == \
        ["cpu_offload_checkpointing"]
    # declared with the settings: the range and the rule that offloading needs checkpointing
    from sd_scripts.core.problems import Problems
    from sd_scripts.core.rules import check_engine_values, check_rules

    found = Problems()
    check_engine_values(TrainConfig(blocks_to_swap=-1), found, ["blocks_to_swap"])
    check_rules(TrainConfig(cpu_offload_checkpointing=True), "engine", found)
    assert [e.setting for e in found.errors] == ["blocks_to_swap", "cpu_offload_checkpointing"]
    assert "needs gradient_checkpointing" in str(found.errors[1])


def test_flux_detection_reads_the_block_counts(tiny_flux_files):
    from sd_scripts.core.config import TrainConfig
    from sd_scripts.models.loading import detect_family

    family, info = detect_family(TrainConfig(pretrained_model_name_or_path=str(tiny_flux_files["transformer"])))
    assert family.name == "flux" and (info["double_blocks"], info["single_blocks"]) == (2, 2)
