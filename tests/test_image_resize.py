"""The dataset downscaler (sd_scripts/data/image_resize.py)."""

from __future__ import annotations

import hashlib
import math

import pytest
from PIL import Image

from sd_scripts.core.errors import ConfigError
from sd_scripts.data.image_resize import resize_dataset, target_size


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _gradient(w, h, mode="RGB"):
    img = Image.new(mode, (w, h))
    px = img.load()
    for x in range(w):
        for y in range(h):
            v = (x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), 128)
            px[x, y] = v + (200,) if mode == "RGBA" else v
    return img


@pytest.fixture()
def dataset(tmp_path):
    src = tmp_path / "src"
    (src / "10_sks dog").mkdir(parents=True)
    (src / "2_reg").mkdir()
    _gradient(800, 600).save(src / "10_sks dog" / "a.jpg")
    (src / "10_sks dog" / "a.txt").write_text("sks dog, grass", encoding="utf-8")
    (src / "10_sks dog" / "a.npz").write_bytes(b"latents")
    _gradient(300, 200).save(src / "10_sks dog" / "b.png")
    _gradient(64, 64).save(src / "10_sks dog" / "b.webp")  # same name as b.png
    _gradient(1000, 500, "RGBA").save(src / "2_reg" / "c.png")
    # EXIF orientation 6 (rotate 90): stored 640x480, shown 480x640
    exif = Image.Exif()
    exif[0x0112] = 6
    _gradient(640, 480).save(src / "2_reg" / "d.jpg", exif=exif)
    return src


@pytest.mark.parametrize("w,h,size,d", [(800, 600, 512, 64), (1024, 1024, 512, 64), (300, 200, 512, 64),
                                         (1000, 500, 384, 8), (3000, 17, 256, 1)])
def test_target_size_matches_direct_computation(w, h, size, d):
    got = target_size(w, h, size, d)
    if w * h > size * size:
        s = math.sqrt(size * size / (w * h))
        rw, rh = round(w * s), round(h * s)
    else:
        rw, rh = w, h
    assert got == ((rw, rh), (rw // d * d, rh // d * d))
    assert got[1][0] * got[1][1] <= size * size


def test_target_size_too_small():
    assert target_size(50, 300, 512, 64) is None


def test_resize_dataset(dataset, tmp_path):
    before = _digest(dataset)
    dst = tmp_path / "out"
    report = resize_dataset(dataset, dst, [512, 256], "area", 64, workers=2)
    assert _digest(dataset) == before  # the source is never touched
    out = dst / "512" / "10_sks dog"
    a = Image.open(out / "a.png")
    assert a.format == "PNG" and a.size == (576, 384)
    assert (out / "a.txt").read_text(encoding="utf-8") == "sks dog, grass"
    assert not (out / "a.npz").exists()
    assert Image.open(out / "b.png").size == (256, 192)  # never enlarged, only cropped to a multiple
    assert Image.open(dst / "512" / "2_reg" / "c.png").size == (704, 320)
    d = Image.open(dst / "512" / "2_reg" / "d.png")
    assert d.size == (384, 576) and d.size[0] < d.size[1]  # EXIF rotation applied
    for p in (dst / "256").rglob("*.png"):
        w, h = Image.open(p).size
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 256 * 256
    assert any("b.webp" in s and "same name" in r for s, r in report.skipped)
    assert len(report.written) == 8


def test_interpolations_and_divisible_by(dataset, tmp_path):
    for interp in ("cubic", "lanczos4"):
        resize_dataset(dataset, tmp_path / interp, [384], interp, divisible_by=8, workers=1)
        assert Image.open(tmp_path / interp / "384" / "10_sks dog" / "a.png").size == (440, 328)


def test_bad_inputs_write_nothing(dataset, tmp_path):
    dst = tmp_path / "o"
    for kwargs, match in (
        (dict(src=tmp_path / "missing", dst=dst, sizes=[512]), "src"),
        (dict(src=dataset, dst=dataset / "inside", sizes=[512]), "overlap"),
        (dict(src=dataset, dst=dst, sizes=[0]), "sizes"),
        (dict(src=dataset, dst=dst, sizes=[32]), "sizes"),
        (dict(src=dataset, dst=dst, sizes=[512], interpolation="nearest"), "interpolation"),
        (dict(src=dataset, dst=dst, sizes=[512], divisible_by=0), "divisible_by"),
    ):
        with pytest.raises(ConfigError, match=match):
            resize_dataset(**kwargs)
        assert not dst.exists() and not (dataset / "inside").exists()
    resize_dataset(dataset, dst, [256], workers=1)
    with pytest.raises(ConfigError, match="overwrite"):
        resize_dataset(dataset, dst, [256], workers=1)
    resize_dataset(dataset, dst, [256], workers=1, overwrite=True)
