"""Numerical contracts of the pure LoRA math (sd_scripts/networks/lora_math.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sd_scripts.networks import lora_math as lm
from tests.lora_synth import gen, low_rank_matrix


def _close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- scale


def test_lora_scale_missing_or_zero_alpha_means_rank():
    assert lm.lora_scale(None, 8) == 1.0
    assert lm.lora_scale(0.0, 8) == 1.0
    assert lm.lora_scale(torch.tensor([4.0]), 8) == 0.5  # LyCORIS' [1]-shaped alpha
    assert lm.lora_scale(torch.tensor(2.0), 8) == 0.25


# ---------------------------------------------------------------- delta formulas by hand


@pytest.mark.parametrize("kernel", [None, 1, 3])
def test_lora_delta_matches_hand_computation(kernel):
    g = gen(1)
    r, out, inn = 3, 5, 4
    if kernel is None:
        down, up = torch.randn(r, inn, generator=g), torch.randn(out, r, generator=g)
        expected = 0.5 * torch.stack([torch.stack([sum(up[p, i] * down[i, q] for i in range(r)) for q in range(inn)])
                                      for p in range(out)])
    else:
        down, up = torch.randn(r, inn, kernel, kernel, generator=g), torch.randn(out, r, 1, 1, generator=g)
        expected = 0.5 * torch.einsum("pi,iqkl->pqkl", up[:, :, 0, 0], down)
    _close(lm.lora_delta(down, up, scale=0.5), expected)


def test_tucker_lora_delta_matches_loop():
    g = gen(2)
    r, out, inn, k = 3, 4, 5, 3
    down = torch.randn(r, inn, 1, 1, generator=g)
    mid = torch.randn(r, r, k, k, generator=g)
    up = torch.randn(out, r, 1, 1, generator=g)
    expected = torch.zeros(out, inn, k, k)
    for p in range(out):
        for q in range(inn):
            for i in range(r):
                for j in range(r):
                    expected[p, q] += mid[i, j] * up[p, i, 0, 0] * down[j, q, 0, 0]
    _close(lm.lora_delta(down, up, mid, scale=0.25), 0.25 * expected)
    u, d = lm.lora_updown(down, up, mid)
    _close((u @ d).reshape(out, inn, k, k), expected)


def test_loha_delta_matches_hand_computation():
    g = gen(3)
    out, n, r = 6, 7, 2
    w1a, w1b, w2a, w2b = (torch.randn(out, r, generator=g), torch.randn(r, n, generator=g),
                          torch.randn(out, r, generator=g), torch.randn(r, n, generator=g))
    expected = torch.zeros(out, n)
    for p in range(out):
        for q in range(n):
            expected[p, q] = (w1a[p] @ w1b[:, q]) * (w2a[p] @ w2b[:, q])
    _close(lm.loha_delta(w1a, w1b, w2a, w2b, scale=0.5), 0.5 * expected)
    u, d = lm.loha_updown(w1a, w1b, w2a, w2b)
    assert u.shape == (out, r * r) and d.shape == (r * r, n)
    _close(u @ d, expected)


def test_loha_tucker_delta_matches_hand_computation():
    g = gen(4)
    out, inn, r, k = 4, 3, 2, 3
    t1, t2 = torch.randn(r, r, k, k, generator=g), torch.randn(r, r, k, k, generator=g)
    w1a, w2a = torch.randn(r, out, generator=g), torch.randn(r, out, generator=g)  # transposed layout
    w1b, w2b = torch.randn(r, inn, generator=g), torch.randn(r, inn, generator=g)

    def rebuild(t, wa, wb):
        w = torch.zeros(out, inn, k, k)
        for p in range(out):
            for q in range(inn):
                for i in range(r):
                    for j in range(r):
                        w[p, q] += t[i, j] * wb[j, q] * wa[i, p]
        return w

    expected = rebuild(t1, w1a, w1b) * rebuild(t2, w2a, w2b)
    _close(lm.loha_delta(w1a, w1b, w2a, w2b, t1, t2, scale=2.0), 2.0 * expected)
    u, d = lm.loha_updown(w1a, w1b, w2a, w2b, t1, t2)
    _close((u @ d).reshape(out, inn, k, k), expected)


@pytest.mark.parametrize("case", ["full_full", "w2_decomposed", "both_decomposed", "conv_full", "conv_flat", "conv_tucker"])
def test_lokr_delta_matches_hand_kron(case):
    g = gen(5)
    ol, ok, im, in_, r, k = 2, 3, 2, 4, 2, 3
    w1 = torch.randn(ol, im, generator=g)
    w1a, w1b = torch.randn(ol, r, generator=g), torch.randn(r, im, generator=g)
    args = dict(w1=w1)
    if case == "full_full":
        w2 = torch.randn(ok, in_, generator=g)
        args.update(w2=w2)
        m1, m2 = w1, w2
    elif case in ("w2_decomposed", "both_decomposed"):
        w2a, w2b = torch.randn(ok, r, generator=g), torch.randn(r, in_, generator=g)
        args.update(w2a=w2a, w2b=w2b)
        m2 = w2a @ w2b
        m1 = w1
        if case == "both_decomposed":
            args = dict(w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b)
            m1 = w1a @ w1b
    elif case == "conv_full":
        w2 = torch.randn(ok, in_, k, k, generator=g)
        args.update(w2=w2)
        m1, m2 = w1, w2
    elif case == "conv_flat":
        w2a, w2b = torch.randn(ok, r, generator=g), torch.randn(r, in_ * k * k, generator=g)
        args.update(w2a=w2a, w2b=w2b)
        m1, m2 = w1, (w2a @ w2b).reshape(ok, in_, k, k)
    else:
        t2 = torch.randn(r, r, k, k, generator=g)
        w2a, w2b = torch.randn(r, ok, generator=g), torch.randn(r, in_, generator=g)
        args.update(w2a=w2a, w2b=w2b, t2=t2)
        m1, m2 = w1, torch.einsum("ijkl,ip,jq->pqkl", t2, w2a, w2b)
    # hand Kronecker product, element by element
    kern = m2.shape[2:]
    expected = torch.zeros((ol * ok, im * in_) + tuple(kern))
    for a in range(ol):
        for b in range(ok):
            for c in range(im):
                for d in range(in_):
                    expected[a * ok + b, c * in_ + d] = m1[a, c] * m2[b, d]
    got = lm.lokr_delta(**args, scale=0.5, shape=expected.shape)
    _close(got, 0.5 * expected)
    u, d = lm.lokr_updown(**args)
    _close((u @ d).reshape(expected.shape), expected)


@pytest.mark.parametrize("on_input", [False, True])
@pytest.mark.parametrize("conv", [False, True])
def test_ia3_delta_matches_hand_computation(on_input, conv):
    g = gen(6)
    out, inn = 4, 3
    w = torch.randn(out, inn, 3, 3, generator=g) if conv else torch.randn(out, inn, generator=g)
    c = inn if on_input else out
    ia3 = torch.randn((1, c, 1, 1) if conv else (c,), generator=g)
    vec = ia3.reshape(-1)
    expected = torch.empty_like(w)
    for p in range(out):
        for q in range(inn):
            expected[p, q] = w[p, q] * (vec[q] if on_input else vec[p])
    _close(lm.ia3_delta(w, ia3, on_input), expected)


# ---------------------------------------------------------------- SVD


@pytest.mark.parametrize("out,n,r", [(64, 48, 8), (32, 144, 4), (16, 16, 16), (40, 9, 12)])
def test_factor_space_and_full_matrix_svd_agree(out, n, r):
    g = gen(7)
    u, d = torch.randn(out, r, generator=g), torch.randn(r, n, generator=g)
    fs = lm.factor_svd(u, d, force="factor")
    full = lm.factor_svd(u, d, force="dense")
    assert fs.method == "factor" and full.method == "dense"
    k = min(r, out, n)
    _close(fs.S[:k], full.S[:k], rtol=1e-4, atol=1e-5)
    _close(fs.U[:, :k] * fs.S[:k] @ fs.Vh[:k], u @ d, rtol=1e-4, atol=1e-4)
    for rank in (1, max(1, k // 2), k):
        a = lm.split_factors(fs, rank)
        b = lm.split_factors(full, rank)
        _close(a[0] @ a[1], b[0] @ b[1], rtol=1e-3, atol=1e-4)
    assert abs(fs.total_sq - float((u @ d).double().pow(2).sum())) < 1e-3 * fs.total_sq


def test_factor_space_is_used_for_low_rank_shapes():
    assert lm.factor_space_is_cheaper(1280, 1280, 128)
    assert lm.factor_space_is_cheaper(320, 2880, 32)
    assert not lm.factor_space_is_cheaper(8, 8, 64)


def test_randomized_svd_is_close_and_reports_itself():
    w, s = low_rank_matrix(400, 300, 60, gen(8), decay=0.85)
    res = lm.dense_svd(w, rank=8)
    assert res.method == "randomized" and not res.exact
    exact = lm.dense_svd(w)
    assert exact.exact
    _close(res.S[:8], exact.S[:8], rtol=1e-3, atol=1e-4)
    stats = lm.retained_stats(res, 8)
    best = lm.retained_stats(exact, 8)
    assert abs(stats["rel_error"] - best["rel_error"]) < 1e-3


def test_split_factors_balances_singular_values():
    w, _ = low_rank_matrix(20, 30, 5, gen(9))
    res = lm.dense_svd(w)
    up, down = lm.split_factors(res, 5)
    _close(up @ down, w, atol=1e-5)
    _close(up.norm(dim=0), down.norm(dim=1), rtol=1e-4)


# ---------------------------------------------------------------- rank selection vs a numpy reference


def _numpy_rank(s, method, param, cap):
    s = np.asarray(s, dtype=np.float64)
    n = len(s)
    cap = max(1, min(cap, n))
    if s[0] <= 0:
        return 1
    if method == "fixed":
        k = cap
    elif method == "sv_ratio":
        k = sum(1 for v in s if v > 0 and s[0] / v <= param)
    elif method == "sv_fro":
        k = next(i + 1 for i in range(n) if np.sqrt(np.sum(s[: i + 1] ** 2) / np.sum(s ** 2)) >= param - 1e-12)
    elif method == "sv_cumulative":
        k = next(i + 1 for i in range(n) if np.sum(s[: i + 1]) / np.sum(s) >= param - 1e-12)
    elif method == "threshold":
        k = int(np.sum(s > param))
    elif method == "ratio":
        k = int(np.sum(s > param * s[0]))
    elif method == "quantile":
        k = int(np.sum(np.cumsum(s) < param * np.sum(s) * (1 - 1e-9)))
    return max(1, min(k, cap))


@pytest.mark.parametrize("method,params", [
    ("sv_ratio", [1.0, 1.5, 2.0, 4.0, 10.0, 1e9]),
    ("sv_fro", [0.1, 0.5, 0.9, 0.99, 1.0]),
    ("sv_cumulative", [0.1, 0.5, 0.9, 0.99, 1.0]),
    ("threshold", [0.0, 0.05, 0.5, 5.0]),
    ("ratio", [0.0, 0.1, 0.5, 0.99]),
    ("quantile", [0.1, 0.5, 0.9, 1.0]),
    ("fixed", [None]),
])
def test_rank_selection_matches_numpy_reference(method, params):
    rng = np.random.default_rng(10)
    spectra = [np.array([10, 5, 3, 1, 0.5, 0.1, 0, 0], dtype=float)]
    for _ in range(20):
        spectra.append(np.sort(rng.exponential(1.0, size=rng.integers(1, 40)))[::-1])
    spectra.append(np.ones(6))
    for s in spectra:
        for param in params:
            for cap in (1, 3, 64):
                got = lm.select_rank(torch.tensor(s.copy()), method, param, cap)
                assert got == _numpy_rank(s, method, param, cap), (method, param, cap, s)


def test_rank_selection_documented_example():
    # reference A.4 example: kohya keeps one more than needed; we keep the minimum
    s = torch.tensor([10, 5, 3, 1, 0.5, 0.1, 0, 0], dtype=torch.float64)
    assert lm.select_rank(s, "sv_fro", 0.9, 8) == 2
    assert lm.select_rank(s, "sv_cumulative", 0.9, 8) == 3
    assert lm.select_rank(s, "sv_ratio", 4, 8) == 3
    assert lm.select_rank(torch.zeros(5), "sv_fro", 0.9, 8) == 1


def test_quantile_matches_torch_quantile():
    from sd_scripts.networks.lora_math import quantile

    values = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.5, 0.9, 0.99, 0.999, 1.0):
        assert math.isclose(quantile(values, q), float(torch.quantile(values, q)), rel_tol=1e-6, abs_tol=1e-7)


def test_clamped_factors_clamp_kohyas_quantity_and_keep_the_product():
    from sd_scripts.networks.lora_math import clamped_factors, dense_svd

    g = torch.Generator().manual_seed(1)
    delta = torch.randn(64, 8, generator=g) @ torch.randn(8, 96, generator=g) * 0.01
    res = dense_svd(delta, randomized=False)
    up, down = clamped_factors(res, 8, 0.99)
    # kohya: U diag(S) and Vh, clamped together at the 0.99 quantile of their values
    u = res.U[:, :8] * res.S[:8]
    vh = res.Vh[:8]
    hi = float(torch.quantile(torch.cat([u.flatten(), vh.flatten()]), 0.99))
    expected = u.clamp(-hi, hi) @ vh.clamp(-hi, hi)
    assert torch.allclose(up @ down, expected, atol=1e-7)
    assert torch.allclose(up.norm(dim=0), down.norm(dim=1), rtol=1e-4)  # stored balanced
    assert not torch.allclose(expected, delta, atol=1e-9)  # the clamp did cut something
