"""FLUX.1 training with the memory savers, end to end on a tiny model: fp8_base (block linears stored in float8),
gradient checkpointing with cpu_offload_checkpointing, the text-encoder output cache, and blocks_to_swap (on
CUDA: the ``gpu`` test, the same losses as without swapping and a lower peak)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from helpers import flux_settings, make_dataset, tiny_config  # noqa: E402


def _config(files, tmp_path, **overrides):
    data = make_dataset(tmp_path / "data", size=(64, 64))
    values = flux_settings(files) | {"resolution": "64", "bucket_reso_steps": 64, "max_train_steps": 3,
                                     "network_dim": 4, "network_alpha": 2.0, "clip_skip": None,
                                     "network_train_unet_only": True, "cache_text_encoder_outputs": True,
                                     "cache_latents": True, "learning_rate": 1e-3}
    values.update(overrides)
    return tiny_config(files["transformer"], data, tmp_path / "out", **values)


def _train(config):
    from sd_scripts.training.loop import train

    messages = []

    class Collect:
        def on_message(self, text):
            messages.append(text)

    result = train(config, callbacks=Collect())
    return result, messages


def test_fp8_base_with_checkpointing_and_cpu_offload_trains_and_checkpointing_changes_nothing(tiny_flux_files,
                                                                                            tmp_path):
    from safetensors import safe_open

    files = _tiny_flux_with_more_blocks(tiny_flux_files, tmp_path / "model")
    plain, _ = _train(_config(files, tmp_path / "a", fp8_base=True, mixed_precision="bf16"))
    saver, messages = _train(_config(files, tmp_path / "b", fp8_base=True, mixed_precision="bf16",
                                     gradient_checkpointing=True, cpu_offload_checkpointing=True, blocks_to_swap=2))
    assert len(plain.losses) == 3 and all(loss == loss for loss in plain.losses)
    assert saver.losses == plain.losses  # recomputing the blocks in the backward pass gives the same numbers
    assert not any("fp8_base: has no effect" in m for m in messages + saver.warnings)  # float8 works on the CPU too
    assert any("blocks_to_swap: has no effect here" in w for w in messages + saver.warnings)
    with safe_open(saver.output_path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_fp8_base"] == "True" and meta["ss_gradient_checkpointing"] == "True"


def _tiny_flux_with_more_blocks(files, folder):
    """The tiny FLUX.1 files with a 3 + 5 block transformer (enough blocks to swap some)."""
    import dataclasses

    from safetensors.torch import save_file

    from sd_scripts.models.flux.transformer import FluxTransformer
    from sd_scripts.testing.tiny_flux import tiny_flux_params

    torch.manual_seed(0)
    model = FluxTransformer(dataclasses.replace(tiny_flux_params(True), depth=3, depth_single_blocks=5))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "flux1-tiny-3-5.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return dict(files, transformer=path)


@pytest.mark.gpu
def test_gpu_blocks_to_swap_trains_the_same_lora(tiny_flux_files, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    files = _tiny_flux_with_more_blocks(tiny_flux_files, tmp_path / "model")
    common = dict(mixed_precision="bf16", fp8_base=True, gradient_checkpointing=True, optimizer_type="AdamW")
    whole, _ = _train(_config(files, tmp_path / "a", **common))
    swapped, messages = _train(_config(files, tmp_path / "b", blocks_to_swap=4, **common))
    assert swapped.losses == whole.losses
    assert not any("has no effect" in m for m in messages + swapped.warnings)
