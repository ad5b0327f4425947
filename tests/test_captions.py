"""kohya's caption pipeline (order, dropout, keep_tokens, shuffle, tag dropout, warm-up) and tag counting."""

from __future__ import annotations

import random

from sd_scripts.data.captions import CaptionSettings, count_tags, process_caption, split_tags, warmup_steps

CAP = "sks dog, red collar, outdoors, grass, sunny, smiling"
TAGS = split_tags(CAP)


def run(caption=CAP, seed=0, epoch=1, step=0, max_steps=0, **kw):
    return process_caption(caption, CaptionSettings(**kw), random.Random(seed), epoch, step, max_steps)


def test_plain_caption_unchanged_first_line_only():
    assert run() == CAP
    assert run("a, b\nsecond line") == "a, b"


def test_prefix_and_suffix_take_part_in_shuffle():
    assert run(caption_prefix="masterpiece", caption_suffix="best") == "masterpiece " + CAP + " best"
    out = run("a, b", caption_prefix="p,", caption_suffix=", s", shuffle_caption=True, seed=1)
    assert sorted(split_tags(out)) == ["a", "b", "p", "s"]


def test_caption_dropout_rate():
    assert run(caption_dropout_rate=1.0) == ""
    results = [run(seed=s, caption_dropout_rate=0.5) for s in range(200)]
    dropped = sum(r == "" for r in results)
    assert 60 < dropped < 140


def test_dropout_every_n_epochs_is_one_based():
    kept = [run(epoch=e, caption_dropout_every_n_epochs=2) != "" for e in (1, 2, 3, 4, 5)]
    assert kept == [True, False, True, False, True]


def test_shuffle_keeps_first_keep_tokens_and_all_tags():
    outs = {run(seed=s, shuffle_caption=True, keep_tokens=2) for s in range(20)}
    assert len(outs) > 1
    for out in outs:
        tags = split_tags(out)
        assert tags[:2] == TAGS[:2]
        assert sorted(tags) == sorted(TAGS)


def test_shuffle_is_reproducible_from_the_rng():
    a = [run(seed=7, shuffle_caption=True) for _ in range(3)]
    assert len(set(a)) == 1
    rng = random.Random(7)
    seq1 = [process_caption(CAP, CaptionSettings(shuffle_caption=True), rng) for _ in range(5)]
    rng = random.Random(7)
    seq2 = [process_caption(CAP, CaptionSettings(shuffle_caption=True), rng) for _ in range(5)]
    assert seq1 == seq2


def test_tag_dropout_only_drops_flexible_tags():
    assert run(caption_tag_dropout_rate=1.0, keep_tokens=1) == "sks dog"
    outs = [split_tags(run(seed=s, caption_tag_dropout_rate=0.5, keep_tokens=1)) for s in range(50)]
    assert all(o[0] == "sks dog" for o in outs)
    assert any(len(o) < len(TAGS) for o in outs) and any(len(o) > 2 for o in outs)


def test_token_warmup_steps_and_fraction():
    s = dict(token_warmup_step=10, token_warmup_min=1, keep_tokens=1)
    assert split_tags(run(step=0, **s)) == TAGS[:2]  # fixed + min flex
    assert len(split_tags(run(step=5, **s))) == 1 + 1 + (5 * (len(TAGS) - 1 - 1)) // 10
    assert split_tags(run(step=10, **s)) == TAGS
    assert warmup_steps(0.5, 100) == 50
    assert warmup_steps(20, 100) == 20
    frac = dict(token_warmup_step=0.5, token_warmup_min=2)
    assert split_tags(run(step=0, max_steps=100, **frac)) == TAGS[:2]
    assert split_tags(run(step=50, max_steps=100, **frac)) == TAGS


def test_keep_tokens_separator_with_fixed_suffix():
    cap = "1girl, solo ||| red hair, smile, blue eyes ||| masterpiece"
    for s in range(10):
        tags = split_tags(run(cap, seed=s, shuffle_caption=True, keep_tokens_separator="|||"))
        assert tags[:2] == ["1girl", "solo"]
        assert tags[-1] == "masterpiece"
        assert sorted(tags[2:-1]) == ["blue eyes", "red hair", "smile"]


def test_secondary_separator_keeps_a_group_together():
    cap = "a, b;;;c, d"
    for s in range(10):
        out = run(cap, seed=s, shuffle_caption=True, secondary_separator=";;;")
        assert "b,c" in out.replace(" ", "")


def test_wildcards_pick_lines_and_choices():
    cap = "a {red|blue} dog {{literal}}\nsecond line"
    outs = {run(cap, seed=s, enable_wildcard=True) for s in range(40)}
    assert outs == {"a red dog {literal}", "a blue dog {literal}", "second line"}


def test_count_tags_lowercases_and_strips():
    counts = count_tags(["Sks Dog, red,  red ", "sks dog,,", ""])
    assert counts == {"sks dog": 2, "red": 2}
    assert count_tags(["Sks Dog, red", "sks dog"], lowercase=False) == {"Sks Dog": 1, "red": 1, "sks dog": 1}
