"""GPU-only checks (skipped without CUDA): mixed precision (also full_fp16/full_bf16, fp8_base), xformers, 8-bit
AdamW, VRAM of SD1.5.

Run on a CUDA machine with ``bash run_tests.sh -m gpu``.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import make_dataset, tiny_config

pytestmark = pytest.mark.gpu


def _train(config):
    from sd_scripts.training.loop import train

    return train(config)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains(tiny_sd1_diffusers, tmp_path, precision):
    data = make_dataset(tmp_path / "data")
    result = _train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "out", mixed_precision=precision,
                                save_precision=precision, max_train_steps=6))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    sd = load_file(result.output_path)
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    assert all(v.dtype == dtype for v in sd.values())
    assert any(float(v.float().abs().max()) > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_full_half_precision_network_trains(tiny_sd1_diffusers, tmp_path, precision):
    """full_fp16/full_bf16: the network itself in half precision (fp16 gradients through the loss scaler); lowram
    loads the model part by part into the GPU."""
    data = make_dataset(tmp_path / "data")
    result = _train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "out", mixed_precision=precision,
                                full_fp16=precision == "fp16", full_bf16=precision == "bf16", max_train_steps=6,
                                learning_rate=1e-2, lowram=True))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    sd = load_file(result.output_path)
    assert any(float(v.float().abs().max()) > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))


@pytest.mark.parametrize("name", ["fp8_base", "fp8_base_unet"])
def test_fp8_base_trains_sdxl(tiny_sdxl_diffusers, tmp_path, name):
    """kohya's fp8_base: float8 frozen weights computed through autocast, text encoders trained too."""
    data = make_dataset(tmp_path / "data")
    result = _train(tiny_config(tiny_sdxl_diffusers, data, tmp_path / "out", mixed_precision="bf16", max_train_steps=4,
                                bucket_reso_steps=32, learning_rate=1e-2, **{name: True}))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    sd = load_file(result.output_path)
    assert any(k.startswith("lora_te2_") for k in sd)
    assert any(float(v.float().abs().max()) > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))


def test_xformers_attention(tiny_sd1_diffusers, tmp_path):
    pytest.importorskip("xformers")
    data = make_dataset(tmp_path / "data")
    result = _train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "out", xformers=True, mixed_precision="fp16"))
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_adamw8bit_on_cuda_keeps_8bit_state():
    pytest.importorskip("bitsandbytes")
    from sd_scripts.core.config import TrainConfig
    from sd_scripts.training.optimizers import build_optimizer

    p = torch.nn.Parameter(torch.randn(256, 256, device="cuda"))
    opt, name = build_optimizer(TrainConfig(optimizer_type="AdamW8bit"), [{"params": [p], "lr": 1e-3}])
    p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state[p]
    assert state["state1"].dtype == torch.uint8 and "AdamW8bit" in name


def test_sd15_unet_lora_step_vram():
    """One bf16 training step of a full-size SD1.5-shaped UNet + rank-32 LoRA at 512 px, batch 1."""
    from diffusers import UNet2DConditionModel

    from sd_scripts.models.families import get_family
    from sd_scripts.networks.lora import create_network

    unet = UNet2DConditionModel(**get_family("sd1").diffusers_unet_config(False)).to("cuda", torch.bfloat16)
    unet.requires_grad_(False)
    unet.enable_gradient_checkpointing()
    unet.train()
    net = create_network(unet, None, network_dim=32, network_alpha=16, train_text_encoder=False)
    net.apply_to()
    net.to("cuda")
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    torch.cuda.reset_peak_memory_stats()
    x = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(1, 77, 768, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = unet(x, torch.tensor([500], device="cuda"), h).sample.float().pow(2).mean()
    loss.backward()
    opt.step()
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    print(f"SD1.5 UNet LoRA step, bf16, gradient checkpointing, 512 px: peak {peak_gib:.2f} GiB")
    assert peak_gib < 8, "an SD1.5 LoRA step must fit an 8 GB card"
