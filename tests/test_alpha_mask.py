"""kohya's alpha masks: ``alpha_mask`` turns each image's alpha channel into a loss mask.

The mask is transformed exactly like the image (resize, crop, flip), cached with the latents (memory and
disk), multiplied into the per-element loss after an area resize to the latent size, and a transparent
image contributes nothing to training. ``masked_loss`` without any ``alpha_mask`` is a one-line error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_scripts.core.config import TrainConfig
from sd_scripts.data.dataset import TrainDataset
from sd_scripts.data.dataset_layout import scan_dataset
from sd_scripts.core.errors import UserError
from sd_scripts.training.noise import apply_masked_loss, per_sample_mse
from tests.helpers import make_dataset, tiny_config, tree_digest

SUBSET = "1_sks shape"


def cfg(**kw) -> TrainConfig:
    base = dict(resolution="64", min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=64, train_batch_size=1)
    base.update(kw)
    return TrainConfig(**base)


def save_rgba(path: Path, rgb: np.ndarray, alpha: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), "RGBA").save(path)
    path.with_suffix(".txt").write_text("sks shape", encoding="utf-8")
    return path


def rect_image(path: Path, size=(96, 64), box=(24, 8, 56, 40)) -> Path:
    """Grey RGB, alpha 255 inside ``box`` (left, top, right, bottom) and 0 outside."""
    w, h = size
    alpha = np.zeros((h, w), np.uint8)
    left, top, right, bottom = box
    alpha[top:bottom, left:right] = 255
    return save_rgba(path, np.full((h, w, 3), 128, np.uint8), alpha)


def alpha_in_red(path: Path, size=(100, 70)) -> Path:
    """An image whose colour channels equal its alpha (a gradient with a hole), so the mask must equal the
    image's red channel after any transform that treats the two alike."""
    w, h = size
    x = np.arange(w)[None, :].repeat(h, 0)
    y = np.arange(h)[:, None].repeat(w, 1)
    alpha = ((x * 255) // (w - 1) + y) % 256
    alpha[10:30, 5:25] = 0
    alpha = alpha.astype(np.uint8)
    return save_rgba(path, np.dstack([alpha] * 3), alpha)


def batches(ds: TrainDataset, epochs=range(1, 2)):
    for e in epochs:
        ds.set_epoch(e)
        for i in range(len(ds)):
            yield ds[i]


def rgb_encode(x: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a VAE: 8x8 average pooling plus a mean channel."""
    pooled = torch.nn.functional.avg_pool2d(x, 8)
    return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)


class CountingEncoder:
    def __init__(self):
        self.images = 0

    def __call__(self, x):
        self.images += x.shape[0]
        return rgb_encode(x)


# ------------------------------------------------------------------------------------ the mask itself


def test_mask_is_the_alpha_rectangle_after_centre_crop_and_flip(tmp_path):
    rect_image(tmp_path / "data" / SUBSET / "a.png")  # 96x64 -> bucket 64x64, centre crop of 16 px
    config = cfg(train_data_dir=str(tmp_path / "data"), alpha_mask=True, flip_aug=True)
    ds = TrainDataset(scan_dataset(config), config, 0)
    expected = np.zeros((64, 64), np.float32)
    expected[8:40, 8:40] = 1.0  # x 24..56 less the 16 px cropped on the left
    seen = set()
    for b in batches(ds, range(1, 9)):
        mask = b["alpha_masks"]
        assert mask.dtype == torch.float32 and tuple(mask.shape) == (1, 64, 64)
        want = expected[:, ::-1] if b["flipped"][0] else expected
        assert np.array_equal(mask[0].numpy(), want)
        seen.add(b["flipped"][0])
    assert seen == {False, True}


def test_mask_follows_resize_random_crop_and_flip_exactly_like_the_image(tmp_path):
    alpha_in_red(tmp_path / "data" / SUBSET / "a.png")  # 100x70 -> resized 91x64, cropped to 64x64
    config = cfg(train_data_dir=str(tmp_path / "data"), alpha_mask=True, flip_aug=True, random_crop=True)
    ds = TrainDataset(scan_dataset(config), config, 3)
    crops, flips = set(), set()
    for b in batches(ds, range(1, 13)):
        red = (b["images"][0, 0] + 1.0) / 2.0  # [-1, 1] back to 0..1
        assert torch.allclose(b["alpha_masks"][0], red, atol=1e-6)
        # the colour channels are the stored ones, not composited (kohya drops the alpha)
        assert torch.equal(b["images"][0, 0], b["images"][0, 1])
        flips.add(b["flipped"][0])
        crops.add(float(b["alpha_masks"][0].sum()))
    assert flips == {False, True} and len(crops) > 2  # several random crop offsets were seen


def test_image_without_alpha_gives_ones(tmp_path):
    make_dataset(tmp_path / "data", SUBSET, count=1, size=(96, 64))
    config = cfg(train_data_dir=str(tmp_path / "data"), alpha_mask=True, flip_aug=True)
    for b in batches(TrainDataset(scan_dataset(config), config, 0), range(1, 3)):
        assert torch.equal(b["alpha_masks"], torch.ones(1, 64, 64))


def test_without_alpha_mask_transparency_is_composited_on_white_and_there_are_no_masks(tmp_path):
    rect_image(tmp_path / "data" / SUBSET / "a.png")
    config = cfg(train_data_dir=str(tmp_path / "data"))
    b = TrainDataset(scan_dataset(config), config, 0)[0]
    assert b["alpha_masks"] is None
    assert float(b["images"][0, :, 0, 0].min()) == 1.0  # a transparent corner is white


def test_toml_subset_key_and_the_global_setting(tmp_path):
    rect_image(tmp_path / "masked" / "a.png")
    make_dataset(tmp_path, "plain", count=1, size=(64, 64))
    toml = tmp_path / "d.toml"
    toml.write_text(
        "[[datasets]]\nresolution = 64\nbatch_size = 2\n"
        f"[[datasets.subsets]]\nimage_dir = '{tmp_path / 'masked'}'\nalpha_mask = true\n"
        f"[[datasets.subsets]]\nimage_dir = '{tmp_path / 'plain'}'\n",
        encoding="utf-8",
    )
    config = cfg(dataset_config=str(toml))
    plan = scan_dataset(config)
    assert [s.alpha_mask for s in plan.subsets] == [True, False]
    assert plan.subsets[0].metadata()["alpha_mask"] is True and "alpha_mask" not in plan.subsets[1].metadata()
    b = TrainDataset(plan, config, 0)[0]
    masks = dict(zip(b["image_paths"], b["alpha_masks"]))
    plain = next(m for p, m in masks.items() if "plain" in p)
    masked = next(m for p, m in masks.items() if "masked" in p)
    assert torch.equal(plain, torch.ones(64, 64))  # a subset without alpha_mask counts fully
    assert float(masked.sum()) == 32 * 32
    # alpha_mask as a setting (kohya's --alpha_mask) applies to every subset that does not set it
    assert [s.alpha_mask for s in scan_dataset(cfg(dataset_config=str(toml), alpha_mask=True)).subsets] == [True, True]


def test_masked_loss_without_alpha_mask_is_one_line_error(tmp_path):
    make_dataset(tmp_path / "data", SUBSET, count=1)
    with pytest.raises(UserError) as err:
        scan_dataset(cfg(train_data_dir=str(tmp_path / "data"), masked_loss=True))
    message = str(err.value)
    assert "\n" not in message and message.startswith("masked_loss") and "alpha_mask" in message
    scan_dataset(cfg(train_data_dir=str(tmp_path / "data"), masked_loss=True, alpha_mask=True))  # fine


def test_argstore_setting_reaches_the_engine():
    from ArgsList import ArgStore
    from frontend.settings_map import to_train_config

    config = to_train_config(ArgStore(alpha_mask=True, masked_loss=True), has_cuda=True, has_xformers=True).config
    assert config.alpha_mask is True and config.masked_loss is True


def test_the_wizard_offers_alpha_mask_only_for_transparent_images(tmp_path):
    from ArgsList import ArgStore
    from popups.asker import ScriptedAsker
    from popups.training_flow import TrainingWizard

    model = tmp_path / "model.safetensors"
    model.write_bytes(b"not read by the wizard")
    data = make_dataset(tmp_path / "data", SUBSET, count=2)

    def run(**more):
        script = {"base_model": str(model), "img_folder": str(data), "output_folder": str(tmp_path / "out"), **more}
        asker = ScriptedAsker(script)
        return TrainingWizard(asker, ArgStore()).run(), asker.keys

    store, keys = run()
    assert "alpha_mask" not in keys and store.alpha_mask is False
    rect_image(data / SUBSET / "t.png")
    store, keys = run(alpha_mask=True)
    assert keys.index("alpha_mask") == keys.index("flip_aug") + 1 and store.alpha_mask is True


# ------------------------------------------------------------------------------------------- the loss


def test_masked_mse_equals_the_hand_computed_loss_and_ignores_masked_elements():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    target = torch.randn(2, 4, 8, 8, generator=g)
    masks = torch.rand(2, 64, 64, generator=g)
    masks[1, :, :32] = 0.0  # the left half of the second image is transparent
    got = per_sample_mse(pred, target, masks)
    area = masks.reshape(2, 8, 8, 8, 8).mean(dim=(2, 4))  # 8x8 blocks -> latent pixels
    expected = ((pred - target) ** 2 * area[:, None]).sum(dim=(1, 2, 3)) / (4 * 8 * 8)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(per_sample_mse(pred, target, None), per_sample_mse(pred, target, torch.ones(2, 64, 64)))
    got.sum().backward()
    assert torch.count_nonzero(pred.grad[1, :, :, :4]) == 0  # no gradient from the transparent half
    assert torch.count_nonzero(pred.grad[1, :, :, 4:]) == 4 * 8 * 4
    changed = target.clone()
    changed[1, :, :, :4] += 5.0
    assert torch.allclose(per_sample_mse(pred, changed, masks), got)
    assert torch.equal(apply_masked_loss(target, None), target)


@pytest.mark.slow
def test_training_step_loss_is_the_masked_loss_with_loss_weights_and_min_snr(tiny_sd1_diffusers, tmp_path,
                                                                              monkeypatch):
    """Spies on the masking step (wherever the loop's loss function calls it) and the SNR, and rebuilds the
    step's loss by hand: mean over C, H, W of loss x area-resized mask, x loss weight x min-SNR weight."""
    import importlib

    from sd_scripts.training import noise
    from sd_scripts.training import loop as train_loop

    data = make_dataset(tmp_path / "data", SUBSET, count=1, size=(64, 64))
    rect_image(data / SUBSET / "b.png", size=(64, 64), box=(8, 16, 40, 56))
    masked: list[tuple] = []
    snrs: list[torch.Tensor] = []
    original_mask, original_snr, original_step = noise.apply_masked_loss, noise.snr_of, train_loop._Trainer._step_loss

    def mask_spy(loss, masks):
        out = original_mask(loss, masks)
        masked.append((loss.detach().float(), masks, out.detach().float()))
        return out

    def snr_spy(*args, **kwargs):
        out = original_snr(*args, **kwargs)
        snrs.append(out.detach().float())
        return out

    def step(self, batch):
        masked.clear()
        snrs.clear()
        loss = original_step(self, batch)
        assert len(masked) == 1
        elementwise, masks, out = masked[0]
        assert masks is not None and tuple(masks.shape) == (2, 64, 64)
        area = masks.reshape(2, 8, 8, 8, 8).mean(dim=(2, 4)).to(elementwise.device)
        assert float(area.min()) < 1.0  # the rectangle image is partly transparent
        assert torch.allclose(out, elementwise * area[:, None], rtol=1e-6, atol=1e-8)
        per_sample = out.mean(dim=(1, 2, 3))
        snr = snrs[-1]
        min_snr = torch.clamp(snr, max=5.0) / snr
        expected = (per_sample * batch["loss_weights"].to(per_sample.device) * min_snr).mean()
        assert torch.allclose(loss.detach().float(), expected, rtol=1e-5, atol=1e-8)
        step.checked += 1
        return loss

    step.checked = 0
    monkeypatch.setattr(noise, "apply_masked_loss", mask_spy)
    monkeypatch.setattr(noise, "snr_of", snr_spy)
    try:  # the loop's loss function may live in loss_terms, which imports apply_masked_loss by name
        loss_terms = importlib.import_module("sd_scripts.training.losses")
        monkeypatch.setattr(loss_terms, "apply_masked_loss", mask_spy)
    except ImportError:
        pass
    monkeypatch.setattr(train_loop._Trainer, "_step_loss", step)
    config = tiny_config(tiny_sd1_diffusers, data, tmp_path / "out", alpha_mask=True, min_snr_gamma=5.0,
                         max_train_steps=2, cache_latents=False)
    train_loop.train(config)
    assert step.checked == 2


@pytest.mark.slow
def test_a_transparent_image_contributes_nothing(tiny_sd1_diffusers, tmp_path):
    """Two datasets that differ only in a fully transparent image train the same LoRA (the image shares
    every batch with an opaque one, so each step still has a gradient)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from sd_scripts.training.loop import train

    rng = np.random.default_rng(0)
    loras, digests = [], []
    for run in range(2):
        data = make_dataset(tmp_path / f"data{run}", SUBSET, count=1, size=(64, 64))
        rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # different colours under alpha 0
        save_rgba(data / SUBSET / "t.png", rgb, np.zeros((64, 64), np.uint8))
        before = tree_digest(data)
        out = tmp_path / f"out{run}"
        result = train(tiny_config(tiny_sd1_diffusers, data, out, alpha_mask=True, max_train_steps=3,
                                   cache_latents=True, cache_latents_to_disk=True))
        assert tree_digest(data) == before, "the dataset must not be modified"
        loras.append(load_file(result.output_path))
        with safe_open(result.output_path, "pt") as f:
            md = f.metadata()
        assert md["ss_alpha_mask"] == "True" and md["ss_masked_loss"] == "True"
        digests.append(before)
    assert digests[0]["1_sks shape/t.png"] != digests[1]["1_sks shape/t.png"]
    assert loras[0].keys() == loras[1].keys()
    moved = False
    for key, value in loras[0].items():
        assert torch.allclose(value, loras[1][key], rtol=0, atol=1e-6), key
        moved = moved or (key.endswith("lora_up.weight") and float(value.abs().max()) > 0)
    assert moved


# ----------------------------------------------------------------------------------------- the cache


def test_cached_masks_in_memory_and_on_disk_reload(tmp_path):
    data = tmp_path / "data"
    alpha_in_red(data / SUBSET / "a.png")
    rect_image(data / SUBSET / "b.png")
    out = tmp_path / "out"
    config = cfg(train_data_dir=str(data), output_dir=str(out), alpha_mask=True, flip_aug=True,
                 cache_latents=True, cache_latents_to_disk=True)
    before = tree_digest(data)
    plan = scan_dataset(config)
    ds = TrainDataset(plan, config, 7)
    uncached = list(batches(ds, range(1, 5)))
    enc = CountingEncoder()
    ds.cache_latents(enc, 2, True, "vae-a")
    assert enc.images == 4  # two images and their mirrors
    cached = list(batches(ds, range(1, 5)))
    assert any(b["flipped"][0] for b in cached) and not all(b["flipped"][0] for b in cached)
    for u, c in zip(uncached, cached):
        assert c["images"] is None and c["flipped"] == u["flipped"]
        assert torch.equal(c["alpha_masks"], u["alpha_masks"])  # flipped masks too

    files = sorted((out / ".latent_cache").glob("*.npz"))
    assert len(files) == 2
    for f in files:
        with np.load(f) as npz:
            assert npz["alpha_mask"].dtype == np.float32 and npz["alpha_mask"].shape == (64, 64)
            assert 0.0 <= float(npz["alpha_mask"].min()) and float(npz["alpha_mask"].max()) <= 1.0

    enc = CountingEncoder()
    again = TrainDataset(plan, config, 7)
    again.cache_latents(enc, 2, True, "vae-a")
    assert enc.images == 0  # everything, masks included, came from the disk
    for u, c in zip(uncached, batches(again, range(1, 5))):
        assert torch.equal(c["alpha_masks"], u["alpha_masks"])
    assert tree_digest(data) == before


def test_changing_alpha_mask_invalidates_the_disk_cache(tmp_path):
    data = tmp_path / "data"
    rect_image(data / SUBSET / "a.png")
    out = tmp_path / "out"
    base = dict(train_data_dir=str(data), output_dir=str(out), cache_latents=True, cache_latents_to_disk=True)

    def run(**kw):
        config = cfg(**base, **kw)
        ds = TrainDataset(scan_dataset(config), config, 0)
        enc = CountingEncoder()
        ds.cache_latents(enc, 1, True, "vae-a")
        return enc.images, ds[0]["alpha_masks"]

    assert run() == (1, None)
    assert run()[0] == 0
    images, masks = run(alpha_mask=True)
    assert images == 1 and float(masks.sum()) == 32 * 32  # the cache without masks was not taken
    assert run(alpha_mask=True)[0] == 0
    assert run() == (0, None)  # the unmasked cache is still there, under its own key
    assert len(list((out / ".latent_cache").glob("*.npz"))) == 2
