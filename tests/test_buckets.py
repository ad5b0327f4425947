"""Aspect-ratio buckets: kohya's bucket list, assignment, crops, metadata."""

from __future__ import annotations

import random

import pytest

from sd_scripts.data.buckets import (
    BucketManager,
    bucket_info,
    crop_ltrb,
    crop_offsets,
    make_bucket_resolutions,
    snap_bucket_range,
)

KOHYA_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]


def test_512_gives_kohyas_17_buckets():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == KOHYA_512


def test_1024_gives_41_buckets():
    buckets = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert len(buckets) == 41
    assert (1024, 1024) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 for w, h in buckets)
    assert buckets == sorted(buckets)


def test_non_square_resolution_keeps_area():
    buckets = make_bucket_resolutions((768, 512), 256, 1024, 64)
    assert all(w * h <= 768 * 512 for w, h in buckets)
    side = int((768 * 512) ** 0.5 // 64) * 64
    assert (side, side) in buckets


def test_snap_bucket_range():
    assert snap_bucket_range(300, 1000, 64) == (256, 1024)
    assert snap_bucket_range(256, 1024, 64) == (256, 1024)


@pytest.mark.parametrize(
    "size, bucket, resized",
    [
        ((512, 512), (512, 512), (512, 512)),
        ((1024, 1024), (512, 512), (512, 512)),
        ((1000, 600), (640, 384), (640, 384)),
        ((2000, 500), (1024, 256), (1024, 256)),
        ((500, 2000), (256, 1024), (256, 1024)),
        ((640, 384), (640, 384), (640, 384)),  # exactly a bucket: used as is
        ((300, 200), (640, 384), (640, 427)),  # upscaled to cover
    ],
)
def test_select_bucket(size, bucket, resized):
    manager = BucketManager((512, 512), 256, 1024, 64)
    got_bucket, got_resized, ar_error = manager.select_bucket(*size)
    assert got_bucket == bucket
    assert got_resized == resized
    assert ar_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])


def test_select_bucket_always_covers_and_picks_nearest_ar():
    manager = BucketManager((512, 512), 256, 1024, 64)
    rng = random.Random(0)
    for _ in range(300):
        w, h = rng.randint(50, 3000), rng.randint(50, 3000)
        bucket, resized, _ = manager.select_bucket(w, h)
        assert resized[0] >= bucket[0] and resized[1] >= bucket[1]
        assert resized[0] == bucket[0] or resized[1] == bucket[1]
        ar = w / h
        best = min(abs(bw / bh - ar) for bw, bh in KOHYA_512)
        assert abs(bucket[0] / bucket[1] - ar) == pytest.approx(best)


def test_no_upscale_keeps_small_images_and_floors_to_steps():
    manager = BucketManager((512, 512), reso_steps=64, no_upscale=True)
    bucket, resized, _ = manager.select_bucket(300, 200)
    assert resized == (300, 200)
    assert bucket == (256, 192)
    assert (256, 192) in manager.sorted_resos()


def test_no_upscale_shrinks_large_images_to_the_area():
    manager = BucketManager((512, 512), reso_steps=64, no_upscale=True)
    rng = random.Random(1)
    for _ in range(200):
        w, h = rng.randint(600, 4000), rng.randint(600, 4000)
        bucket, resized, _ = manager.select_bucket(w, h)
        assert bucket[0] % 64 == 0 and bucket[1] % 64 == 0
        assert resized[0] >= bucket[0] and resized[1] >= bucket[1]
        assert bucket[0] * bucket[1] <= 512 * 512
        assert abs(resized[0] / resized[1] - w / h) < 0.05 * (w / h)


def test_no_upscale_too_small_raises():
    manager = BucketManager((512, 512), reso_steps=64, no_upscale=True)
    with pytest.raises(ValueError):
        manager.select_bucket(40, 300)


def test_predefined_single_bucket_for_no_bucketing():
    manager = BucketManager((512, 512), predefined=[(512, 512)])
    assert manager.select_bucket(1000, 600) == ((512, 512), (853, 512), pytest.approx(1 - 1000 / 600))


def test_crop_offsets_centre_and_random():
    assert crop_offsets((700, 384), (640, 384)) == (30, 0)
    assert crop_offsets((640, 401), (640, 384)) == (0, 8)
    rng = random.Random(3)
    seen = {crop_offsets((700, 384), (640, 384), rng) for _ in range(300)}
    assert all(0 <= left <= 60 and top == 0 for left, top in seen)
    assert {0, 60} <= {left for left, _ in seen}  # both ends reachable
    a = [crop_offsets((700, 500), (640, 384), random.Random(5)) for _ in range(3)]
    assert len(set(a)) == 1
    with pytest.raises(ValueError):
        crop_offsets((600, 384), (640, 384))


def test_crop_ltrb_fits_image_in_bucket():
    assert crop_ltrb((512, 512), (1000, 500)) == (0, 128, 512, 384)
    assert crop_ltrb((512, 512), (500, 1000)) == (128, 0, 384, 512)
    assert crop_ltrb((640, 384), (640, 384)) == (0, 0, 640, 384)


def test_bucket_info_layout():
    resos = make_bucket_resolutions((512, 512), 256, 1024, 64)
    info = bucket_info({(512, 512): 10, (640, 384): 4}, [0.0, 0.5, -0.5], resos)
    assert info["buckets"] == {
        8: {"resolution": (512, 512), "count": 10},
        10: {"resolution": (640, 384), "count": 4},
    }
    assert info["mean_img_ar_error"] == pytest.approx(1 / 3)
