"""Image oddities through preflight and the training batches (test_dataset.py covers the image
functions themselves): broken images skipped and named, real decompression-bomb headers refused,
all eight EXIF orientations, palette / CMYK / 16-bit / transparent images as the model sees them."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import UserErrors
from sd_scripts.training.preflight import preflight
from tests.helpers import tree_digest


def _cfg(root: Path, **kw) -> TrainConfig:
    values = dict(train_data_dir=str(root), output_dir=str(root.parent / "out"), resolution="64", min_bucket_reso=64,
                  max_bucket_reso=128, bucket_reso_steps=64, enable_bucket=True, learning_rate=1e-4,
                  optimizer_type="AdamW", max_train_steps=1)
    values.update(kw)
    return TrainConfig(**values)


def _chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG file that claims ``width`` x ``height`` pixels (as a decompression bomb does)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def _png16_rgb(w: int, h: int, rgb16: tuple[int, int, int]) -> bytes:
    row = b"\x00" + struct.pack(">" + "H" * 3 * w, *(rgb16 * w))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(row * h))
            + _chunk(b"IEND", b""))


def _good(path: Path, color=(200, 30, 30), size=(64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


# --------------------------------------------------------------------------------------- broken


def test_broken_images_are_skipped_by_name_and_the_run_goes_on(tmp_path):
    root = tmp_path / "train"
    sub = root / "3_thing"
    _good(sub / "ok1.png")
    _good(sub / "ok2.jpg", (10, 200, 10))
    jpeg = (sub / "ok2.jpg").read_bytes()
    (sub / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (sub / "zero.png").write_bytes(b"")
    (sub / "html.webp").write_text("<html>404 not found</html>", encoding="utf-8")
    (sub / "bomb.png").write_bytes(_png_header_only(40_000, 40_000))
    before = tree_digest(root)
    plan = preflight(_cfg(root), model_given=True)
    skipped = {os.path.basename(p): reason for p, reason in plan.dataset.skipped}
    assert set(skipped) == {"cut.jpg", "zero.png", "html.webp", "bomb.png"}
    assert "decompression-bomb" in skipped["bomb.png"] and skipped["zero.png"] == "empty file"
    warning = next(w for w in plan.warnings if w.startswith("skipped 4 image(s)"))
    for name in skipped:
        assert name in warning
    assert plan.summary == ["dataset: 2 training image(s) in 1 folder(s), 6 with repeats; 2 without a caption file "
                            "(2 use their folder's class tokens); 4 skipped"]
    assert tree_digest(root) == before


def test_a_dataset_of_only_broken_images_is_one_error(tmp_path):
    root = tmp_path / "train"
    sub = root / "3_thing"
    sub.mkdir(parents=True)
    (sub / "a.png").write_bytes(_png_header_only(30_000, 30_000))
    (sub / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(UserErrors) as e:
        preflight(_cfg(root), model_given=True)
    assert len(e.value.errors) == 1
    text = str(e.value)
    assert text.startswith("train_data_dir: none of the images can be used (2 skipped") and "\n" not in text


def test_decompression_bomb_just_over_the_limit_is_refused_too(tmp_path):
    """Between Pillow's limit and twice it Pillow only warns; the scan refuses the image all the same."""
    limit = Image.MAX_IMAGE_PIXELS
    side = int((limit * 1.2) ** 0.5) + 1
    root = tmp_path / "train"
    _good(root / "1_x" / "ok.png")
    (root / "1_x" / "big.png").write_bytes(_png_header_only(side, side))
    plan = preflight(_cfg(root), model_given=True)
    assert [os.path.basename(p) for p, _ in plan.dataset.skipped] == ["big.png"]
    assert "decompression-bomb" in plan.dataset.skipped[0][1]


# --------------------------------------------------------------------------------------- what training sees


def _batches(root: Path, **kw) -> dict[str, np.ndarray]:
    """Every image of the dataset as the training batches hold it: HxWx3 uint8, by file name."""
    from sd_scripts.data.dataset import TrainDataset

    config = _cfg(root, train_batch_size=1, **kw)
    plan = preflight(config, model_given=True)
    assert plan.dataset.skipped == []
    ds = TrainDataset(plan.dataset, config, 0)
    ds.set_epoch(1)
    out = {}
    for i in range(len(ds)):
        batch = ds[i]
        for path, img in zip(batch["image_paths"], batch["images"]):
            arr = ((img.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
            out[os.path.basename(path)] = arr
    return out


_ORIENTATION_TO_STORED = {  # the stored pixels of a picture whose EXIF orientation says how to show them
    1: lambda im: im,
    2: lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    3: lambda im: im.transpose(Image.Transpose.ROTATE_180),
    4: lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
    5: lambda im: im.transpose(Image.Transpose.TRANSPOSE),
    6: lambda im: im.transpose(Image.Transpose.ROTATE_90),  # shown rotated 90 degrees clockwise
    7: lambda im: im.transpose(Image.Transpose.TRANSVERSE),
    8: lambda im: im.transpose(Image.Transpose.ROTATE_270),  # shown rotated 90 degrees counter-clockwise
}


def _quadrants(width: int, height: int) -> Image.Image:
    arr = np.zeros((height, width, 3), np.uint8)
    h2, w2 = height // 2, width // 2
    arr[:h2, :w2] = (255, 0, 0)  # top left red
    arr[:h2, w2:] = (0, 255, 0)  # top right green
    arr[h2:, :w2] = (0, 0, 255)  # bottom left blue
    arr[h2:, w2:] = (255, 255, 255)  # bottom right white
    return Image.fromarray(arr)


def test_every_exif_orientation_is_shown_upright_in_the_batches(tmp_path):
    root = tmp_path / "train"
    sub = root / "1_x"
    sub.mkdir(parents=True)
    shown = _quadrants(64, 128)  # portrait as displayed
    for orientation, to_stored in _ORIENTATION_TO_STORED.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        to_stored(shown).save(sub / f"o{orientation}.jpg", exif=exif, quality=95)
    images = _batches(root, resolution="128", max_bucket_reso=256)
    assert len(images) == 8
    for orientation in _ORIENTATION_TO_STORED:
        arr = images[f"o{orientation}.jpg"].astype(int)
        h, w, _ = arr.shape
        assert h > w, (orientation, arr.shape)  # a portrait bucket for all of them
        for (fy, fx), color in (((0.25, 0.25), (255, 0, 0)), ((0.25, 0.75), (0, 255, 0)),
                                ((0.75, 0.25), (0, 0, 255)), ((0.75, 0.75), (255, 255, 255))):
            pixel = arr[int(h * fy), int(w * fx)]
            assert np.abs(pixel - color).max() < 40, (orientation, (fy, fx), pixel)


def test_image_modes_are_converted_as_the_model_should_see_them(tmp_path):
    root = tmp_path / "train"
    sub = root / "1_x"
    sub.mkdir(parents=True)
    size = (64, 64)
    # palette with a transparent index: the transparent pixels become white
    pal = Image.new("P", size, 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    for x in range(32):
        for y in range(64):
            pal.putpixel((x, y), 0)
    pal.save(sub / "palette.png", transparency=0)
    # half-transparent black on white: mid grey
    Image.new("RGBA", size, (0, 0, 0, 128)).save(sub / "rgba.png")
    # fully transparent grey+alpha: white
    Image.new("LA", size, (0, 0)).save(sub / "la.png")
    # RGB with a transparent colour (tRNS chunk): that colour becomes white
    rgb = Image.new("RGB", size, (10, 20, 30))
    rgb.paste((200, 100, 0), (32, 0, 64, 64))
    rgb.save(sub / "rgb_trns.png", transparency=(10, 20, 30))
    # CMYK JPEG: pure cyan ink -> cyan
    Image.new("CMYK", size, (255, 0, 0, 0)).save(sub / "cmyk.jpg", quality=95)
    # 16-bit greyscale and 16-bit RGB: scaled to 8 bits, not clipped
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(sub / "grey16.png")
    (sub / "rgb16.png").write_bytes(_png16_rgb(64, 64, (65535, 32768, 0)))
    # 1-bit
    Image.new("1", size, 1).save(sub / "bilevel.png")
    # a large file that is scaled down into the bucket stays its colour
    Image.new("RGB", (256, 256), (0, 128, 255)).save(sub / "large.webp", lossless=True)

    images = _batches(root)

    def centre(name, x=48):
        return tuple(int(v) for v in images[name][32, x])

    def near(a, b, tol=3):
        return all(abs(p - q) <= tol for p, q in zip(a, b))

    assert near(centre("palette.png", 16), (255, 255, 255)) and near(centre("palette.png", 48), (255, 0, 0))
    assert near(centre("rgba.png"), (127, 127, 127))
    assert near(centre("la.png"), (255, 255, 255))
    assert near(centre("rgb_trns.png", 16), (255, 255, 255)) and near(centre("rgb_trns.png", 48), (200, 100, 0))
    r, g, b = centre("cmyk.jpg")
    assert r < 60 and g > 200 and b > 200, (r, g, b)
    assert near(centre("grey16.png"), (156, 156, 156), tol=1)  # 40000 / 257
    assert near(centre("rgb16.png"), (255, 128, 0), tol=1)
    assert near(centre("bilevel.png"), (255, 255, 255))
    assert near(centre("large.webp"), (0, 128, 255), tol=2)
