"""Dataset scan, preflight errors, image conversion, TrainDataset batches and the latent cache."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_scripts.core.config import TrainConfig
from sd_scripts.data.dataset import TrainDataset, color_aug, hsv_to_rgb, rgb_to_hsv
from sd_scripts.data.dataset_layout import parse_resolution, scan_dataset
from sd_scripts.core.errors import ConfigError, DatasetError, UserError, UserErrors
from sd_scripts.data.images import ImageProblem, bomb_warnings_as_errors, is_image_file, load_image, probe_image

# --------------------------------------------------------------------------- helpers


def cfg(**kw) -> TrainConfig:
    base = dict(resolution="128", min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=64)
    base.update(kw)
    return TrainConfig(**base)


def save(path: Path, size=(96, 64), color=(200, 30, 30), mode="RGB", fmt=None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, fmt, **kw)
    return path


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


@pytest.fixture
def data(tmp_path) -> Path:
    """train/10_sks dog (3 images, 1 captioned), train/2_cat (1 image)."""
    root = tmp_path / "train"
    save(root / "10_sks dog" / "a.png", (128, 128))
    save(root / "10_sks dog" / "b.png", (192, 128), (0, 200, 0))
    save(root / "10_sks dog" / "c.jpg", (128, 192), (0, 0, 200))
    (root / "10_sks dog" / "a.txt").write_text("sks dog, Red Collar, outdoors\nignored second line", encoding="utf-8")
    save(root / "2_cat" / "x.webp", (100, 100), fmt="WEBP")
    return root


def one_line_error(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


def rgb_encode(x: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a VAE: 8x8 average pooling plus a mean channel."""
    pooled = torch.nn.functional.avg_pool2d(x, 8)
    return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)


# --------------------------------------------------------------------------- scan


def test_scan_dreambooth_layout(data):
    before = snapshot(data)
    plan = scan_dataset(cfg(train_data_dir=str(data)))
    assert plan.num_train_images == 10 * 3 + 2 * 1
    assert plan.num_reg_images == 0
    by_name = {os.path.basename(r.path): r for r in plan.images}
    assert set(by_name) == {"a.png", "b.png", "c.jpg", "x.webp"}
    assert by_name["a.png"].caption == "sks dog, Red Collar, outdoors"
    assert by_name["a.png"].caption_source == "file"
    assert by_name["b.png"].caption == "sks dog" and by_name["b.png"].caption_source == "class_tokens"
    assert by_name["x.webp"].caption == "cat"
    assert by_name["b.png"].size == (192, 128) and by_name["b.png"].repeats == 10
    assert plan.tag_frequency == {"10_sks dog": {"sks dog": 3, "red collar": 1, "outdoors": 1}, "2_cat": {"cat": 1}}
    assert plan.tag_frequency_cased["10_sks dog"]["Red Collar"] == 1
    assert plan.dataset_dirs == {"10_sks dog": {"n_repeats": 10, "img_count": 3}, "2_cat": {"n_repeats": 2, "img_count": 1}}
    assert any("2 of 3 images" in w for w in plan.warnings)
    assert all(isinstance(w, str) and "\n" not in w for w in plan.warnings)
    assert snapshot(data) == before


def test_hidden_and_junk_files_are_ignored(data):
    sub = data / "10_sks dog"
    (sub / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    (sub / "Thumbs.db").write_bytes(b"junk")
    (sub / ".hidden.png").write_bytes(b"junk")
    (data / ".DS_Store").write_bytes(b"junk")
    (data / "__MACOSX").mkdir()
    plan = scan_dataset(cfg(train_data_dir=str(data)))
    assert len(plan.images) == 4
    assert plan.skipped == []
    assert not any("__MACOSX" in w for w in plan.warnings)
    assert is_image_file("A.JPEG") and is_image_file("b.Png") and not is_image_file("._b.png")


def test_caption_extension_other_case_and_mismatch_hint(tmp_path):
    root = tmp_path / "t"
    save(root / "5_x" / "a.png")
    (root / "5_x" / "a.TXT").write_text("from upper", encoding="utf-8")
    plan = scan_dataset(cfg(train_data_dir=str(root)))
    assert plan.images[0].caption == "from upper"
    root2 = tmp_path / "t2"
    save(root2 / "5_x" / "a.png")
    (root2 / "5_x" / "a.caption").write_text("tagged", encoding="utf-8")
    plan = scan_dataset(cfg(train_data_dir=str(root2)))
    assert plan.images[0].caption == "x"
    assert any("caption_extension" in w and ".caption" in w for w in plan.warnings)
    plan = scan_dataset(cfg(train_data_dir=str(root2), caption_extension=".caption"))
    assert plan.images[0].caption == "tagged"


def test_empty_caption_uses_class_tokens_with_warning(data):
    (data / "10_sks dog" / "b.txt").write_text("  \n", encoding="utf-8")
    plan = scan_dataset(cfg(train_data_dir=str(data)))
    rec = next(r for r in plan.images if r.path.endswith("b.png"))
    assert rec.caption == "sks dog"
    assert any("empty caption file" in w and "b.txt" in w for w in plan.warnings)


def test_utf8_bom_caption_is_read(data):
    (data / "10_sks dog" / "b.txt").write_bytes("\ufeffcafé, crème".encode("utf-8"))
    plan = scan_dataset(cfg(train_data_dir=str(data)))
    assert next(r for r in plan.images if r.path.endswith("b.png")).caption == "café, crème"


def test_some_invalid_subfolders_warn(data):
    save(data / "extra" / "z.png")
    save(data / "0_zero" / "z.png")
    save(data / "loose.png")
    plan = scan_dataset(cfg(train_data_dir=str(data)))
    assert len(plan.images) == 4
    assert any("'extra'" in w and "'0_zero'" in w for w in plan.warnings)
    assert any("directly inside" in w for w in plan.warnings)


def test_nested_folders_warn(data):
    save(data / "10_sks dog" / "more" / "n.png")
    plan = scan_dataset(cfg(train_data_dir=str(data)))
    assert any("subfolders of" in w and "'more'" in w for w in plan.warnings)


# --------------------------------------------------------------------------- regularization


def test_reg_balancing_fills_to_train_count(data, tmp_path):
    reg = tmp_path / "reg"
    for i in range(5):
        save(reg / "1_dog" / f"r{i}.png", (128, 128))
    plan = scan_dataset(cfg(train_data_dir=str(data), reg_data_dir=str(reg)))
    regs = [r for r in plan.images if r.is_reg]
    assert plan.num_reg_images == 5
    assert sum(r.repeats for r in regs) == plan.num_train_images == 32
    assert [r.repeats for r in regs] == [7, 7, 6, 6, 6]
    assert plan.reg_dataset_dirs == {"1_dog": {"n_repeats": 1, "img_count": 5}}
    assert "1_dog" not in plan.dataset_dirs


def test_reg_excess_images_are_unused(tmp_path):
    root = tmp_path / "t"
    save(root / "2_x" / "a.png")
    reg = tmp_path / "reg"
    for i in range(5):
        save(reg / "1_y" / f"r{i}.png")
    plan = scan_dataset(cfg(train_data_dir=str(root), reg_data_dir=str(reg)))
    regs = [r for r in plan.images if r.is_reg]
    assert len(regs) == 2 and sum(r.repeats for r in regs) == 2
    assert any("3 of 5 regularization images are not used" in w for w in plan.warnings)


def test_reg_loss_weight_in_batches(data, tmp_path):
    reg = tmp_path / "reg"
    save(reg / "1_dog" / "r.png", (128, 128))
    config = cfg(train_data_dir=str(data), reg_data_dir=str(reg), prior_loss_weight=0.25, train_batch_size=4)
    ds = TrainDataset(scan_dataset(config), config, 1)
    weights = {}
    for i in range(len(ds)):
        b = ds[i]
        for p, w in zip(b["image_paths"], b["loss_weights"].tolist()):
            weights[os.path.basename(p)] = w
    assert weights["r.png"] == 0.25 and weights["a.png"] == 1.0


# --------------------------------------------------------------------------- dataset_config TOML


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_toml_lookup_order_and_datasets(tmp_path):
    a = tmp_path / "imgs_a"
    b = tmp_path / "imgs_b"
    for i in range(2):
        save(a / f"a{i}.png", (128, 128))
        save(b / f"b{i}.png", (256, 128))
    (a / "a0.cap").write_text("from cap file", encoding="utf-8")
    toml = write_toml(
        tmp_path / "ds.toml",
        f"""
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".cap"

[[datasets]]
resolution = 128
batch_size = 2
flip_aug = true

  [[datasets.subsets]]
  image_dir = '{a}'
  num_repeats = 3
  class_tokens = "alpha"
  keep_tokens = 2

[[datasets]]
resolution = [256, 128]
min_bucket_reso = 64
max_bucket_reso = 512

  [[datasets.subsets]]
  image_dir = 'imgs_b'
  is_reg = false
""",
    )
    config = cfg(dataset_config=str(toml), train_batch_size=1, caption_tag_dropout_rate=0.1)
    plan = scan_dataset(config)
    assert plan.from_dataset_config
    assert [d.resolution for d in plan.datasets] == [(128, 128), (256, 128)]
    assert [d.batch_size for d in plan.datasets] == [2, 1]  # dataset -> config fallback
    sa, sb = plan.subsets
    assert sa.num_repeats == 3 and sb.num_repeats == 1
    assert sa.captions.keep_tokens == 2 and sb.captions.keep_tokens == 1  # subset beats general
    assert sa.captions.shuffle_caption and sb.captions.shuffle_caption  # general
    assert sa.flip_aug and not sb.flip_aug  # dataset level only for the first
    assert sa.caption_extension == ".cap"
    assert sa.captions.caption_tag_dropout_rate == 0.1  # from the config
    assert sb.image_dir == str(tmp_path / "imgs_b")  # relative to the TOML's folder
    caps = {os.path.basename(r.path): r.caption for r in plan.images}
    assert caps["a0.png"] == "from cap file" and caps["a1.png"] == "alpha" and caps["b0.png"] == ""
    assert plan.num_train_images == 3 * 2 + 2

    ds = TrainDataset(plan, config, 0)
    assert len(ds) == 3 + 2  # 6 samples in batches of 2, then 2 of 1
    for i in range(len(ds)):
        batch = ds[i]
        assert len(set(batch["target_sizes_hw"])) == 1
        assert len({os.path.dirname(p) for p in batch["image_paths"]}) == 1  # datasets never mix
    meta = ds.datasets_metadata()
    assert meta[1]["resolution"] == (256, 128) and meta[0]["subsets"][0]["num_repeats"] == 3


@pytest.mark.parametrize(
    "body, needles",
    [
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='{d}'\nfliip_aug=true\n", ["fliip_aug", "flip_aug"]),
        ("[general]\nbogus=1\n[[datasets]]\n[[datasets.subsets]]\nimage_dir='{d}'\n", ["unknown key 'bogus'", "[general]"]),
        ("[[subsets]]\nimage_dir='{d}'\n", ["unknown key 'subsets'", "[[datasets]]"]),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='{d}'\nflip_aug='yes'\n", ["flip_aug", "true or false"]),
        ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats=2\n", ["no image_dir"]),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='{d}'\nresolution=512\n", ["'resolution' belongs in [general] or [[datasets]]"]),
        ("[[datasets]]\nimage_dir='{d}'\n", ["'image_dir' belongs in a [[datasets.subsets]]"]),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='{d}'\n[[datasets.subsets]]\nmetadata_file='m.json'\n",
         ["mixes DreamBooth subsets", "metadata_file", "separate [[datasets]]"]),
        ("[[datasets]]\n[[datasets.subsets]\n", ["not valid TOML"]),
        ("[general]\nshuffle_caption=true\n", ["no [[datasets]]"]),
        ("[[datasets]]\nresolution=100\n[[datasets.subsets]]\nimage_dir='{d}'\n", ["resolution", "multiple of bucket_reso_steps"]),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='{d}'\ncaption_dropout_rate=2.0\n", ["caption_dropout_rate", "between 0"]),
    ],
)
def test_toml_errors(tmp_path, data, body, needles):
    toml = write_toml(tmp_path / "bad.toml", body.format(d=data / "2_cat"))
    before = snapshot(data)
    with pytest.raises(ConfigError) as e:
        scan_dataset(cfg(dataset_config=str(toml)))
    one_line_error(e, *needles)
    assert snapshot(data) == before


def test_toml_subset_color_aug_with_cache_latents(tmp_path, data):
    toml = write_toml(tmp_path / "c.toml", f"[[datasets]]\n[[datasets.subsets]]\nimage_dir='{data / '2_cat'}'\ncolor_aug=true\n")
    with pytest.raises(ConfigError) as e:
        scan_dataset(cfg(dataset_config=str(toml), cache_latents=True))
    one_line_error(e, "cache_latents", "color_aug", "2_cat")


def test_toml_missing_image_dir_folder(tmp_path):
    toml = write_toml(tmp_path / "x.toml", "[[datasets]]\n[[datasets.subsets]]\nimage_dir='nope'\n")
    with pytest.raises(DatasetError) as e:
        scan_dataset(cfg(dataset_config=str(toml)))
    one_line_error(e, "image_dir 'nope'", "does not exist")
    with pytest.raises(ConfigError) as e:
        scan_dataset(cfg(dataset_config=str(tmp_path / "missing.toml")))
    one_line_error(e, "dataset_config", "does not exist")


# --------------------------------------------------------------------------- bad inputs


def _bad_cases(tmp_path: Path, data: Path):
    noncap = data / "10_sks dog" / "b.txt"
    return {
        "not set": (cfg(), ConfigError, ["train_data_dir", "not set"]),
        "missing": (cfg(train_data_dir=str(tmp_path / "nope")), DatasetError, ["train_data_dir", "does not exist"]),
        "file": (cfg(train_data_dir=str(data / "10_sks dog" / "a.png")), DatasetError, ["train_data_dir", "not a folder"]),
        "resolution step": (cfg(train_data_dir=str(data), resolution="100"), ConfigError, ["resolution", "bucket_reso_steps"]),
        "resolution text": (cfg(train_data_dir=str(data), resolution="big"), ConfigError, ["resolution", "W,H"]),
        "no bucket res": (cfg(train_data_dir=str(data), enable_bucket=False, resolution="100"), ConfigError, ["resolution", "multiple of 8"]),
        "min bucket": (cfg(train_data_dir=str(data), min_bucket_reso=192), ConfigError, ["min_bucket_reso", "lower it"]),
        "max bucket": (cfg(train_data_dir=str(data), max_bucket_reso=64), ConfigError, ["max_bucket_reso"]),
        "steps": (cfg(train_data_dir=str(data), bucket_reso_steps=12), ConfigError, ["bucket_reso_steps", "multiple of 8"]),
        "color+cache": (cfg(train_data_dir=str(data), cache_latents=True, color_aug=True), ConfigError, ["cache_latents", "color_aug"]),
        "crop+cache": (cfg(train_data_dir=str(data), cache_latents_to_disk=True, random_crop=True), ConfigError, ["cache_latents", "random_crop"]),
        "ext": (cfg(train_data_dir=str(data), caption_extension="txt"), ConfigError, ["caption_extension", "dot"]),
        "tag dropout": (cfg(train_data_dir=str(data), caption_tag_dropout_rate=-0.1), ConfigError, ["caption_tag_dropout_rate"]),
        "batch": (cfg(train_data_dir=str(data), train_batch_size=0), ConfigError, ["train_batch_size"]),
        "reg missing": (cfg(train_data_dir=str(data), reg_data_dir=str(tmp_path / "noreg")), DatasetError, ["reg_data_dir", "does not exist"]),
    }, noncap


@pytest.mark.parametrize(
    "case",
    ["not set", "missing", "file", "resolution step", "resolution text", "no bucket res", "min bucket", "max bucket",
     "steps", "color+cache", "crop+cache", "ext", "tag dropout", "batch", "reg missing"],
)
def test_bad_settings_one_line_error_and_dataset_untouched(tmp_path, data, case):
    cases, _ = _bad_cases(tmp_path, data)
    config, exc, needles = cases[case]
    before = snapshot(data)
    with pytest.raises(exc) as e:
        scan_dataset(config)
    assert isinstance(e.value, UserError)
    one_line_error(e, *needles)
    assert snapshot(data) == before


def test_empty_folder(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DatasetError) as e:
        scan_dataset(cfg(train_data_dir=str(root)))
    one_line_error(e, "train_data_dir", "is empty", "10_mychar")
    assert list(root.iterdir()) == []


def test_images_directly_in_root(tmp_path):
    root = tmp_path / "flat"
    save(root / "a.png")
    before = snapshot(root)
    with pytest.raises(DatasetError) as e:
        scan_dataset(cfg(train_data_dir=str(root)))
    one_line_error(e, "train_data_dir", "directly inside", "10_mychar")
    assert snapshot(root) == before


def test_only_badly_named_subfolders(tmp_path):
    root = tmp_path / "t"
    save(root / "mychar" / "a.png")
    save(root / "x_5" / "a.png")
    before = snapshot(root)
    with pytest.raises(DatasetError) as e:
        scan_dataset(cfg(train_data_dir=str(root)))
    one_line_error(e, "train_data_dir", "no <repeats>_<name> subfolders", "'mychar'", "'x_5'", "10_mychar")
    assert snapshot(root) == before


def test_valid_folders_without_images(tmp_path):
    root = tmp_path / "t"
    (root / "10_x").mkdir(parents=True)
    (root / "10_x" / "notes.txt").write_text("hi")
    with pytest.raises(DatasetError) as e:
        scan_dataset(cfg(train_data_dir=str(root)))
    one_line_error(e, "train_data_dir", "no training images")


def test_non_utf8_caption(data):
    (data / "10_sks dog" / "b.txt").write_bytes("caf\xe9, cr\xe8me".encode("latin-1"))
    before = snapshot(data)
    with pytest.raises(DatasetError) as e:
        scan_dataset(cfg(train_data_dir=str(data)))
    one_line_error(e, "b.txt", "UTF-8")
    assert snapshot(data) == before


def test_independent_problems_are_reported_together(data, tmp_path):
    """A bad resolution, a non-UTF-8 caption and a reg folder with only misnamed subfolders: all at once."""
    (data / "10_sks dog" / "b.txt").write_bytes("caf\xe9".encode("latin-1"))
    save(data / "junk" / "z.png")  # misnamed beside valid folders: a warning, not an error
    reg = tmp_path / "reg"
    save(reg / "dogs" / "r.png")
    before = snapshot(tmp_path)
    with pytest.raises(UserErrors) as e:
        scan_dataset(cfg(train_data_dir=str(data), reg_data_dir=str(reg), resolution="100", enable_bucket=True))
    lines = [str(x) for x in e.value.errors]
    assert len(lines) == 3, lines
    assert lines[0].startswith("resolution:") and "not a multiple of bucket_reso_steps (64)" in lines[0]
    assert lines[1].startswith("reg_data_dir:") and "'dogs'" in lines[1]
    assert lines[2].startswith("train_data_dir:") and "b.txt" in lines[2] and "UTF-8" in lines[2]
    assert all("\n" not in line for line in lines)
    assert "3 problems: " in str(e.value)
    assert snapshot(tmp_path) == before


def test_many_non_utf8_captions_are_capped(tmp_path):
    root = tmp_path / "t"
    for i in range(8):
        save(root / "10_x" / f"i{i}.png")
        (root / "10_x" / f"i{i}.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(UserErrors) as e:
        scan_dataset(cfg(train_data_dir=str(root)))
    lines = [str(x) for x in e.value.errors]
    assert len(lines) == 6, lines
    assert all("is not UTF-8 text" in line for line in lines[:5])
    assert "and 3 more caption file(s)" in lines[5] and lines[5].startswith("train_data_dir:")


def test_missing_train_data_dir_stops_but_keeps_settings_errors(tmp_path):
    with pytest.raises(UserErrors) as e:
        scan_dataset(cfg(train_data_dir=str(tmp_path / "nope"), train_batch_size=0))
    lines = [str(x) for x in e.value.errors]
    assert lines[0].startswith("train_batch_size:") and "does not exist" in lines[1] and len(lines) == 2


# --------------------------------------------------------------------------- broken images


def test_undecodable_images_are_skipped_with_names(data):
    sub = data / "10_sks dog"
    good = (sub / "c.jpg").read_bytes()
    (sub / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (sub / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png at all")
    (sub / "zero.bmp").write_bytes(b"")
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(png, "PNG")
    raw = bytearray(png.getvalue())
    raw[40] ^= 0xFF  # corrupt the IDAT data -> CRC mismatch
    (sub / "crc.png").write_bytes(bytes(raw))
    before = snapshot(data)
    plan = scan_dataset(cfg(train_data_dir=str(data)))
    skipped = {os.path.basename(p): reason for p, reason in plan.skipped}
    assert set(skipped) == {"trunc.jpg", "garbage.png", "zero.bmp", "crc.png"}
    assert len(plan.images) == 4
    assert any("skipped 4 image(s)" in w and "trunc.jpg" in w for w in plan.warnings)
    assert plan.dataset_dirs["10_sks dog"]["img_count"] == 3
    assert snapshot(data) == before


def test_all_images_broken_is_an_error(tmp_path):
    root = tmp_path / "t"
    (root / "3_x").mkdir(parents=True)
    (root / "3_x" / "a.png").write_bytes(b"nope")
    with pytest.raises(DatasetError) as e:
        scan_dataset(cfg(train_data_dir=str(root)))
    one_line_error(e, "none of the images can be used", "a.png")


def test_decompression_bomb_is_skipped(data, monkeypatch):
    save(data / "2_cat" / "big.png", (120, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    plan = scan_dataset(cfg(train_data_dir=str(data)))
    skipped = {os.path.basename(p): reason for p, reason in plan.skipped}
    assert "decompression-bomb" in skipped["big.png"]
    with bomb_warnings_as_errors(), pytest.raises(ImageProblem):
        probe_image(str(data / "2_cat" / "big.png"))


def test_too_small_for_no_upscale_is_skipped(data):
    save(data / "2_cat" / "tiny.png", (40, 50))
    plan = scan_dataset(cfg(train_data_dir=str(data), bucket_no_upscale=True))
    assert any(p.endswith("tiny.png") and "bucket_reso_steps" in r for p, r in plan.skipped)
    plan = scan_dataset(cfg(train_data_dir=str(data)))
    assert any(r.path.endswith("tiny.png") for r in plan.images)
    assert any("less than half the training resolution" in w for w in plan.warnings)


# --------------------------------------------------------------------------- image conversion


def _png16_rgb(w: int, h: int, rgb16: tuple[int, int, int]) -> bytes:
    row = b"\x00" + struct.pack(">" + "H" * 3 * w, *(rgb16 * w))
    raw = row * h

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_exif_orientation_is_honoured(tmp_path):
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, :30] = (255, 0, 0)  # left half red
    arr[:, 30:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    assert probe_image(str(path)) == (40, 60)
    img = np.asarray(load_image(str(path)))
    assert img.shape == (60, 40, 3)
    assert img[5, 20, 0] > 200 and img[5, 20, 2] < 60  # top is red
    assert img[55, 20, 2] > 200 and img[55, 20, 0] < 60  # bottom is blue
    root = tmp_path / "t"
    (root / "1_x").mkdir(parents=True)
    os.replace(path, root / "1_x" / "rot.jpg")
    plan = scan_dataset(cfg(train_data_dir=str(root)))
    assert plan.images[0].size == (40, 60)


def test_mode_conversions(tmp_path):
    # palette with a transparent index -> white
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.save(tmp_path / "pal.png", transparency=0)
    out = np.asarray(load_image(str(tmp_path / "pal.png")))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[4, 4]) == (255, 0, 0)
    # RGBA half transparent black on white -> mid grey
    save(tmp_path / "rgba.png", (8, 8), (0, 0, 0, 128), mode="RGBA")
    px = np.asarray(load_image(str(tmp_path / "rgba.png")))[0, 0]
    assert all(abs(int(v) - 127) <= 2 for v in px)
    # LA fully transparent -> white
    save(tmp_path / "la.png", (8, 8), (0, 0), mode="LA")
    assert tuple(np.asarray(load_image(str(tmp_path / "la.png")))[0, 0]) == (255, 255, 255)
    # CMYK JPEG -> RGB
    save(tmp_path / "cmyk.jpg", (16, 16), (0, 255, 255, 0), mode="CMYK", quality=95)
    img = load_image(str(tmp_path / "cmyk.jpg"))
    r, g, b = np.asarray(img)[8, 8]
    assert img.mode == "RGB" and r > 200 and g < 60 and b < 60
    # 16-bit greyscale: scaled, not clipped to white
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "g16.png")
    assert abs(int(np.asarray(load_image(str(tmp_path / "g16.png")))[0, 0, 0]) - round(40000 / 257)) <= 1
    # 16-bit RGB
    (tmp_path / "rgb16.png").write_bytes(_png16_rgb(6, 4, (65535, 32768, 0)))
    assert probe_image(str(tmp_path / "rgb16.png")) == (6, 4)
    assert tuple(np.asarray(load_image(str(tmp_path / "rgb16.png")))[0, 0]) == (255, 128, 0)
    # greyscale and 1-bit
    save(tmp_path / "l.png", (8, 8), 77, mode="L")
    assert tuple(np.asarray(load_image(str(tmp_path / "l.png")))[0, 0]) == (77, 77, 77)


# --------------------------------------------------------------------------- TrainDataset


def test_batches_never_mix_buckets_and_cover_every_repeat(data):
    config = cfg(train_data_dir=str(data), train_batch_size=4)
    ds = TrainDataset(scan_dataset(config), config, 0)
    counts: dict[str, int] = {}
    for i in range(len(ds)):
        batch = ds[i]
        assert len(set(batch["target_sizes_hw"])) == 1
        for p in batch["image_paths"]:
            counts[os.path.basename(p)] = counts.get(os.path.basename(p), 0) + 1
        images = batch["images"]
        h, w = batch["target_sizes_hw"][0]
        assert images.shape == (len(batch["captions"]), 3, h, w)
        assert images.min() >= -1.0 and images.max() <= 1.0
        assert batch["latents"] is None
    assert counts == {"a.png": 10, "b.png": 10, "c.jpg": 10, "x.webp": 2}
    per_bucket = [sum(v for k, v in counts.items() if k in names) for names in (("a.png", "x.webp"), ("b.png",), ("c.jpg",))]
    assert len(ds) == ds.num_batches_per_epoch == sum(-(-n // 4) for n in per_bucket)
    info = ds.bucket_info
    assert sum(b["count"] for b in info["buckets"].values()) == 32
    assert ds.num_train_images == 32 and ds.tag_frequency and ds.dataset_dirs


def test_image_pixels_and_sizes(tmp_path):
    root = tmp_path / "t"
    arr = np.zeros((128, 256, 3), np.uint8)
    arr[:] = (255, 0, 0)
    arr[:, :64] = (0, 255, 0)  # cropped away by the centre crop
    (root / "1_x").mkdir(parents=True)
    Image.fromarray(arr).save(root / "1_x" / "a.png")
    config = cfg(train_data_dir=str(root))
    ds = TrainDataset(scan_dataset(config), config, 0)
    batch = ds[0]
    img = batch["images"][0]
    assert img.shape == (3, 128, 128)
    assert torch.allclose(img[0], torch.ones_like(img[0]))
    assert torch.allclose(img[1], -torch.ones_like(img[1]))
    assert batch["original_sizes_hw"] == [(128, 256)]
    assert batch["target_sizes_hw"] == [(128, 128)]  # AR 2 ties between 128x128 and 192x64: first wins, as in kohya
    assert batch["crop_top_lefts"] == [(32, 0)]  # kohya's fit-box convention


def test_same_seed_same_order_and_augmentations(data):
    config = cfg(train_data_dir=str(data), train_batch_size=2, flip_aug=True, shuffle_caption=True,
                 caption_dropout_rate=0.2, random_crop=True, color_aug=True)
    plan = scan_dataset(config)

    def epoch_view(ds, epoch):
        ds.set_epoch(epoch)
        out = []
        for i in range(len(ds)):
            b = ds[i]
            out.append((b["image_paths"], b["captions"], b["flipped"], float(b["images"].sum())))
        return out

    a, b, c = TrainDataset(plan, config, 123), TrainDataset(plan, config, 123), TrainDataset(plan, config, 999)
    e1 = epoch_view(a, 1)
    assert e1 == epoch_view(b, 1)
    e2 = epoch_view(a, 2)
    assert [x[0] for x in e2] != [x[0] for x in e1]
    assert epoch_view(a, 1) == e1  # resume: epoch 1 again gives the same batches
    assert [x[0] for x in epoch_view(c, 1)] != [x[0] for x in e1]
    flips = [f for x in e1 + e2 for f in x[2]]
    assert any(flips) and not all(flips)
    with pytest.raises(ValueError):
        a.set_epoch(0)


def test_caption_dropout_epochs_and_token_warmup(data):
    config = cfg(train_data_dir=str(data), caption_dropout_every_n_epochs=2, token_warmup_step=100, token_warmup_min=1)
    ds = TrainDataset(scan_dataset(config), config, 0)
    ds.set_epoch(2)
    assert all(c == "" for i in range(len(ds)) for c in ds[i]["captions"])
    ds.set_epoch(1)
    ds.set_step(0, 1000)
    caps = [c for i in range(len(ds)) for c, p in zip(ds[i]["captions"], ds[i]["image_paths"]) if p.endswith("a.png")]
    assert set(caps) == {"sks dog"}
    ds.set_step(100, 1000)
    caps = [c for i in range(len(ds)) for c, p in zip(ds[i]["captions"], ds[i]["image_paths"]) if p.endswith("a.png")]
    assert set(caps) == {"sks dog, Red Collar, outdoors"}


def test_no_bucketing_uses_resolution(data):
    config = cfg(train_data_dir=str(data), enable_bucket=False, train_batch_size=8)
    ds = TrainDataset(scan_dataset(config), config, 0)
    assert all(set(ds[i]["target_sizes_hw"]) == {(128, 128)} for i in range(len(ds)))


def test_no_upscale_buckets(tmp_path):
    root = tmp_path / "t"
    save(root / "1_x" / "small.png", (100, 70))
    save(root / "1_x" / "big.png", (400, 300))
    config = cfg(train_data_dir=str(root), bucket_no_upscale=True)
    ds = TrainDataset(scan_dataset(config), config, 0)
    sizes = {os.path.basename(ds[i]["image_paths"][0]): ds[i]["target_sizes_hw"][0] for i in range(len(ds))}
    assert sizes["small.png"] == (64, 64)
    h, w = sizes["big.png"]
    assert w * h <= 128 * 128 and w % 64 == 0 and h % 64 == 0


def test_color_aug_helpers():
    rng = np.random.default_rng(0)
    x = rng.random((8, 8, 3))
    assert np.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-6)
    img = (x * 255).astype(np.uint8)
    import random as _random

    changed = 0
    for s in range(60):
        out = color_aug(img, _random.Random(s))
        assert out.shape == img.shape and out.dtype == np.uint8
        diff = np.abs(out.astype(int) - img.astype(int)).max()
        assert diff <= 70  # +-16 degrees of hue moves a saturated channel by up to ~68
        changed += diff > 0
    assert 5 < changed < 40  # about a third of the time


def test_parse_resolution():
    assert parse_resolution("512") == (512, 512)
    assert parse_resolution("512,768") == (512, 768)
    assert parse_resolution([640, 384]) == (640, 384)
    assert parse_resolution(768) == (768, 768)


# --------------------------------------------------------------------------- latent cache


class CountingEncoder:
    def __init__(self, fn=rgb_encode):
        self.fn = fn
        self.images = 0

    def __call__(self, x):
        self.images += x.shape[0]
        return self.fn(x)


def test_memory_latent_cache_with_flip(data):
    config = cfg(train_data_dir=str(data), flip_aug=True, train_batch_size=2, cache_latents=True)
    plan = scan_dataset(config)
    ds = TrainDataset(plan, config, 5)
    uncached = [ds[i] for i in range(len(ds))]
    enc = CountingEncoder()
    ds.cache_latents(enc, vae_batch_size=2, to_disk=False, settings_key="vae-a")
    assert enc.images == 2 * 4  # each image once, plus its mirror
    for i in range(len(ds)):
        b = ds[i]
        assert b["images"] is None and b["flipped"] == uncached[i]["flipped"]
        expected = rgb_encode(uncached[i]["images"])
        assert b["latents"].shape == expected.shape
        assert torch.allclose(b["latents"], expected, atol=1e-5)


def test_disk_cache_reuse_and_invalidation(data, tmp_path):
    out = tmp_path / "out"
    config = cfg(train_data_dir=str(data), output_dir=str(out), cache_latents=True, cache_latents_to_disk=True)
    before = snapshot(data)
    plan = scan_dataset(config)

    enc = CountingEncoder()
    TrainDataset(plan, config, 0).cache_latents(enc, 3, True, "vae-a")
    assert enc.images == 4
    cache_dir = out / ".latent_cache"
    files = sorted(p.name for p in cache_dir.iterdir())
    assert len(files) == 4 and all(f.endswith(".npz") for f in files)
    assert snapshot(data) == before  # nothing written into the dataset

    enc = CountingEncoder()
    ds = TrainDataset(plan, config, 0)
    ds.cache_latents(enc, 3, True, "vae-a")
    assert enc.images == 0  # all reused
    assert ds[0]["latents"] is not None

    enc = CountingEncoder()
    TrainDataset(plan, config, 0).cache_latents(enc, 3, True, "vae-b")
    assert enc.images == 4  # another VAE

    # new content in one image (same size): only that image is encoded again
    save(data / "10_sks dog" / "b.png", (192, 128), (9, 9, 9))
    enc = CountingEncoder()
    TrainDataset(scan_dataset(config), config, 0).cache_latents(enc, 3, True, "vae-a")
    assert enc.images == 1

    # flip_aug needs flipped latents: re-encode (normal + flipped)
    config_f = config.replace(flip_aug=True)
    enc = CountingEncoder()
    TrainDataset(scan_dataset(config_f), config_f, 0).cache_latents(enc, 3, True, "vae-a")
    assert enc.images == 8
    enc = CountingEncoder()
    TrainDataset(scan_dataset(config_f), config_f, 0).cache_latents(enc, 3, True, "vae-a")
    assert enc.images == 0

    # a different bucket (resolution) is a different key
    config_r = config.replace(resolution="192", max_bucket_reso=320)
    enc = CountingEncoder()
    TrainDataset(scan_dataset(config_r), config_r, 0).cache_latents(enc, 3, True, "vae-a")
    assert enc.images == 4

    # a corrupt cache file is recomputed, not trusted
    victim = sorted(cache_dir.glob("*.npz"))[0]
    victim.write_bytes(b"broken")
    enc = CountingEncoder()
    TrainDataset(scan_dataset(config), config, 0).cache_latents(enc, 3, True, "vae-a")
    assert enc.images <= 1
    assert not list(cache_dir.glob("*.tmp")) and not list(cache_dir.glob(".*"))


def test_nan_latents_name_the_image(data):
    config = cfg(train_data_dir=str(data), cache_latents=True)
    ds = TrainDataset(scan_dataset(config), config, 0)

    def nan_encode(x):
        y = rgb_encode(x)
        y[0, 0, 0, 0] = float("nan")
        return y

    with pytest.raises(DatasetError) as e:
        ds.cache_latents(nan_encode, 1, False, "k")
    msg = one_line_error(e, "cache_latents", "NaN")
    assert any(name in msg for name in ("a.png", "b.png", "c.jpg", "x.webp"))


def test_disk_cache_inside_dataset_is_refused(data):
    config = cfg(train_data_dir=str(data), output_dir=str(data / "out"), cache_latents=True, cache_latents_to_disk=True)
    with pytest.raises(ConfigError) as e:
        scan_dataset(config)
    one_line_error(e, "output_dir", "inside the dataset folder")
    config = cfg(train_data_dir=str(data), cache_latents_to_disk=True)
    with pytest.raises(ConfigError) as e:
        scan_dataset(config)
    one_line_error(e, "cache_latents_to_disk", "output_dir")


def _first(batch):
    return batch[0]


def test_dataloader_workers_follow_epochs(data):
    import pickle

    config = cfg(train_data_dir=str(data), train_batch_size=2, shuffle_caption=True, flip_aug=True)
    ds = TrainDataset(scan_dataset(config), config, 11)
    expected = {}
    for epoch in (1, 2):
        ds.set_epoch(epoch)
        expected[epoch] = [(ds[i]["image_paths"], ds[i]["captions"], ds[i]["flipped"]) for i in range(len(ds))]
    assert expected[1] != expected[2]
    loader = torch.utils.data.DataLoader(ds, batch_size=1, shuffle=False, collate_fn=_first, num_workers=1,
                                         persistent_workers=True)
    for epoch in (1, 2):
        ds.set_epoch(epoch)
        got = [(b["image_paths"], b["captions"], b["flipped"]) for b in loader]
        assert got == expected[epoch]
    copy = pickle.loads(pickle.dumps(ds))  # an ordinary pickle freezes epoch and step
    assert copy.epoch == 2 and len(copy) == len(ds)


def test_json_dataset_config_and_duplicate_dirs(tmp_path, data):
    import json

    cat = str(data / "2_cat")
    doc = {
        "datasets": [
            {"resolution": 128, "subsets": [{"image_dir": cat, "num_repeats": 2}, {"image_dir": cat}]},
            {"resolution": 192, "max_bucket_reso": 320, "subsets": [{"image_dir": cat}]},
        ]
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    plan = scan_dataset(cfg(dataset_config=str(path)))
    assert len(plan.subsets) == 2  # the repeat inside dataset 1 is ignored
    assert any("appears twice" in w for w in plan.warnings)
    assert plan.dataset_dirs == {"2_cat": {"n_repeats": 2, "img_count": 1}, "2_cat (2)": {"n_repeats": 1, "img_count": 1}}
    assert plan.num_train_images == 3


def test_preflight_reports_every_dataset_problem(tmp_path, monkeypatch):
    """preflight lists each scan_dataset problem on its own line, beside the other settings' problems."""
    from sd_scripts.training.preflight import preflight
    from sd_scripts.testing.tiny_models import save_tiny_single_file, tiny_tokenizer_cache_dir
    from tests.helpers import make_dataset, tiny_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = save_tiny_single_file(tmp_path / "model.safetensors", "sd1")
    data = make_dataset(tmp_path / "data", count=2)
    (data / "5_sks shape" / "img00.txt").write_bytes(b"caf\xe9")
    (data / "5_sks shape" / "img01.txt").write_bytes(b"\xff bad")
    save(data / "notes" / "z.png")
    config = tiny_config(model, data, tmp_path / "out", tokenizer_cache_dir=str(tiny_tokenizer_cache_dir(model)),
                         resolution="100", enable_bucket=True, bucket_reso_steps=64, network_dim=0)
    with pytest.raises(UserErrors) as e:
        preflight(config)
    lines = [str(x) for x in e.value.errors]
    for start in ("network_dim:", "resolution:", "train_data_dir: caption file"):
        assert any(line.startswith(start) for line in lines), (start, lines)
    assert sum("is not UTF-8 text" in line for line in lines) == 2, lines
    assert all("\n" not in line for line in lines) and len(lines) == len(set(lines))
