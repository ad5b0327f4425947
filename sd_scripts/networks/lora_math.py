"""Pure tensor functions for LoRA-family networks: delta weights, low-rank SVD, rank choice.

This is the bottom layer of the LoRA tools (resize, merge, extract, merge into a checkpoint):
no file names, no state-dict keys, no printing. Every function takes and returns tensors
(or plain numbers) and works on whatever device its inputs are on.

Conventions (kohya-ss/sd-scripts' and LyCORIS 4.1.3's, which the tools' tests in ``tests/test_lora_resize.py``,
``tests/test_lora_merge.py`` and ``tests/test_lycoris_merge.py`` check against):

* A weight of shape ``(out, in)`` or ``(out, in, kh, kw)`` is handled as the matrix
  ``(out, in*kh*kw)``; its delta is reshaped back at the end.
* ``scale = alpha / rank``; a missing alpha or alpha 0 means ``alpha = rank`` (scale 1).
* Low-rank forms are pairs ``(U, D)`` with ``delta = U @ D`` (``U`` is ``(out, R)``, ``D`` is
  ``(R, n)``). Every algorithm with a low-rank structure has one: LoRA/LoCon (Tucker folded into
  ``D``), LoHa (the face-splitting product: a Hadamard product of two rank-r matrices is a
  rank-r**2 product), LoKr (the mixed-product property of the Kronecker product). The SVD of a
  low-rank form is then computed in factor space: QR of ``U`` and of ``D.T`` and an SVD of the
  small ``R x R`` core, never of the full ``out x n`` matrix, unless the shape makes the full
  matrix cheaper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "DYNAMIC_METHODS",
    "EXTRACT_MODES",
    "SVDResult",
    "dense_svd",
    "factor_svd",
    "factor_space_is_cheaper",
    "boft_weight",
    "dora_weight",
    "full_delta",
    "glora_delta",
    "ia3_delta",
    "kernel_of",
    "lokr_delta",
    "lokr_matrices",
    "lokr_updown",
    "loha_delta",
    "loha_updown",
    "lora_delta",
    "lora_scale",
    "lora_updown",
    "lora_weight_shape",
    "matrix_updown",
    "oft_weight",
    "retained_stats",
    "select_rank",
    "split_factors",
]

# Resize methods (kohya names, our "smallest rank that meets the target" semantics).
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
# Extraction modes, as LyCORIS' extract tool defines them.
EXTRACT_MODES = ("fixed", "threshold", "ratio", "quantile")


# --------------------------------------------------------------------------------------------
# scale and shapes


def lora_scale(alpha, rank: int) -> float:
    """``alpha / rank``; alpha missing, zero or not finite means ``alpha = rank`` (scale 1)."""
    if alpha is None:
        return 1.0
    a = float(alpha.item() if isinstance(alpha, torch.Tensor) else alpha)
    if a == 0.0 or not math.isfinite(a):
        return 1.0
    return a / float(rank)


def kernel_of(shape) -> tuple[int, ...]:
    """Kernel part of a weight shape: ``()`` for a linear weight, ``(kh, kw)`` for a conv."""
    return tuple(int(s) for s in shape[2:])


def lora_weight_shape(down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None = None) -> tuple[int, ...]:
    """Shape of the weight a LoRA/LoCon module modifies, as its own tensors imply it."""
    out = int(up.shape[0])
    if mid is not None:
        return (out, int(down.shape[1])) + kernel_of(mid.shape)
    return (out,) + tuple(int(s) for s in down.shape[1:])


# --------------------------------------------------------------------------------------------
# low-rank forms (U, D) with delta = U @ D


def lora_updown(down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA/LoCon as ``(U (out, r), D (r, in*k*k))``; a Tucker ``mid (r, r, k, k)`` is folded into D.

    Tucker: ``delta[p, q] = sum_ij mid[i, j] * up[p, i] * down[j, q]`` (LyCORIS ``rebuild_tucker``),
    so ``D[i, q, k, l] = sum_j mid[i, j, k, l] * down[j, q]``.
    """
    u = up.reshape(up.shape[0], -1)
    if mid is None:
        return u, down.reshape(down.shape[0], -1)
    d2 = down.reshape(down.shape[0], -1)
    folded = torch.einsum("ijkl,jq->iqkl", mid, d2)
    return u, folded.reshape(folded.shape[0], -1)


def _loha_half(w_a: torch.Tensor, w_b: torch.Tensor, t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One Hadamard factor of a LoHa as ``(A (out, r), B (r, n))``."""
    if t is None:
        return w_a.reshape(w_a.shape[0], -1), w_b.reshape(w_b.shape[0], -1)
    # Tucker layout: w_a is (r, out), w_b is (r, in), t is (r, r, k, k);
    # W[p, q] = sum_ij t[i, j] * w_b[j, q] * w_a[i, p]  (LyCORIS functional/loha.py)
    folded = torch.einsum("ijkl,jq->iqkl", t, w_b.reshape(w_b.shape[0], -1))
    return w_a.reshape(w_a.shape[0], -1).T, folded.reshape(folded.shape[0], -1)


def loha_updown(w1a, w1b, w2a, w2b, t1=None, t2=None) -> tuple[torch.Tensor, torch.Tensor]:
    """LoHa ``(A1 B1) * (A2 B2)`` as one low-rank form of rank ``r1 * r2``.

    The face-splitting identity: ``(A1 B1) ⊙ (A2 B2) = (A1 ⊙_row A2) (B1 ⊙_col B2)`` where
    ``(A1 ⊙_row A2)[p, (i, j)] = A1[p, i] A2[p, j]`` and ``(B1 ⊙_col B2)[(i, j), q] = B1[i, q] B2[j, q]``.
    """
    a1, b1 = _loha_half(w1a, w1b, t1)
    a2, b2 = _loha_half(w2a, w2b, t2)
    u = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
    d = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
    return u, d


def matrix_updown(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense matrix as the cheaper of ``(m, I)`` and ``(I, m)`` (rank ``min(rows, cols)``)."""
    rows, cols = m.shape
    if rows <= cols:
        return torch.eye(rows, dtype=m.dtype, device=m.device), m
    return m, torch.eye(cols, dtype=m.dtype, device=m.device)


def lokr_matrices(w1=None, w1a=None, w1b=None, w2=None, w2a=None, w2b=None, t2=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two Kronecker factors of a LoKr module: ``M1 (out_l, in_m)`` and ``M2 (out_k, in_n[, k, k])``.

    ``M2`` is 2-D (possibly ``in_n*k*k`` wide) when stored decomposed without Tucker.
    """
    m1 = w1 if w1 is not None else w1a @ w1b
    if w2 is not None:
        m2 = w2
    elif t2 is not None:
        # LyCORIS: einsum("i j ..., i p, j q -> p q ...", t2, w2_a, w2_b); w2_a is (r, out_k)
        m2 = torch.einsum("ijkl,ip,jq->pqkl", t2, w2a, w2b.reshape(w2b.shape[0], -1))
    else:
        m2 = w2a @ w2b.reshape(w2b.shape[0], -1)
    return m1.reshape(m1.shape[0], -1).contiguous(), m2.contiguous()


def lokr_updown(w1=None, w1a=None, w1b=None, w2=None, w2a=None, w2b=None, t2=None) -> tuple[torch.Tensor, torch.Tensor]:
    """LoKr ``kron(M1, M2)`` as a low-rank form, by ``kron(A1 B1, A2 B2) = kron(A1, A2) kron(B1, B2)``.

    For a conv, the flattened delta is ``kron(M1, M2.reshape(out_k, -1))`` (columns are
    ``(in_m, in_n, kh, kw)`` in row-major order), so the same identity applies.
    """
    if w1 is not None:
        a1, b1 = matrix_updown(w1.reshape(w1.shape[0], -1))
    else:
        a1, b1 = w1a, w1b
    if w2 is not None:
        a2, b2 = matrix_updown(w2.reshape(w2.shape[0], -1))
    elif t2 is not None:
        a2, b2 = _loha_half(w2a, w2b, t2)
    else:
        a2, b2 = w2a, w2b.reshape(w2b.shape[0], -1)
    return torch.kron(a1.contiguous(), a2.contiguous()), torch.kron(b1.contiguous(), b2.contiguous())


# --------------------------------------------------------------------------------------------
# delta weights, computed directly from each algorithm's formula


def lora_delta(down, up, mid=None, scale: float = 1.0, shape=None) -> torch.Tensor:
    """``scale * up @ down`` (Tucker: ``scale * einsum(mid, up, down)``), in the weight's shape."""
    u, d = lora_updown(down, up, mid)
    target = tuple(shape) if shape is not None else lora_weight_shape(down, up, mid)
    return ((u @ d) * scale).reshape(target)


def loha_delta(w1a, w1b, w2a, w2b, t1=None, t2=None, scale: float = 1.0, shape=None) -> torch.Tensor:
    """``scale * (w1a @ w1b) ⊙ (w2a @ w2b)``; Tucker: ``W_x = einsum("ijkl,jq,ip->pqkl", t_x, w_xb, w_xa)``."""
    if t1 is not None:
        m1 = torch.einsum("ijkl,jq,ip->pqkl", t1, w1b.reshape(w1b.shape[0], -1), w1a)
        m2 = torch.einsum("ijkl,jq,ip->pqkl", t2, w2b.reshape(w2b.shape[0], -1), w2a)
    else:
        m1 = w1a @ w1b.reshape(w1b.shape[0], -1)
        m2 = w2a @ w2b.reshape(w2b.shape[0], -1)
    delta = m1 * m2 * scale
    return delta.reshape(tuple(shape)) if shape is not None else delta


def lokr_delta(w1=None, w1a=None, w1b=None, w2=None, w2a=None, w2b=None, t2=None, scale: float = 1.0,
               shape=None) -> torch.Tensor:
    """``scale * kron(M1, M2)``; for a 4-D ``M2`` the 2-D ``M1`` is unsqueezed to ``(out_l, in_m, 1, 1)``."""
    m1, m2 = lokr_matrices(w1, w1a, w1b, w2, w2a, w2b, t2)
    if m2.dim() == 4:
        delta = torch.kron(m1[:, :, None, None], m2)
    else:
        delta = torch.kron(m1, m2)
    delta = delta * scale
    return delta.reshape(tuple(shape)) if shape is not None else delta


def ia3_delta(weight: torch.Tensor, ia3: torch.Tensor, on_input: bool) -> torch.Tensor:
    """(IA)^3 delta ``W ⊙ w`` (so that ``W' = W + m * delta = W ⊙ (1 + m * w)``).

    ``w`` scales output rows (``on_input`` false) or input columns (``on_input`` true);
    stored as ``(C,)`` for linear layers and ``(1, C, 1, 1)`` for convs.
    """
    w = ia3.reshape(-1).to(weight.dtype)
    view = [1] * weight.dim()
    if on_input:
        view[1] = w.shape[0]
    else:
        view[0] = w.shape[0]
    return weight * w.reshape(view)


def full_delta(diff: torch.Tensor, shape=None) -> torch.Tensor:
    """A full ("native fine-tune") module stores its delta as is."""
    return diff.reshape(tuple(shape)) if shape is not None else diff


# --------------------------------------------------------------------------------------------
# weights that depend on the base weight (DoRA, GLoRA, OFT/BOFT), as LyCORIS 4.1.3 computes them


def dora_weight(weight: torch.Tensor, dora_scale: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """DoRA's merged weight from ``weight = W + delta`` (delta without the multiplier):
    ``weight * (m * (dora_scale / (||weight|| + eps) - 1) + 1)``, as LyCORIS' ``weight_decompose``.

    The norm axis is read from ``dora_scale``'s shape: ``(out, 1, ...)`` gives one norm per output row
    (``wd_on_output=True``), ``(1, in, ...)`` one per input column over the other axes (the older layout).
    ``eps`` is float32's, the dtype LyCORIS keeps ``dora_scale`` in."""
    weight = weight.float()
    s = dora_scale.float()
    extra = [1] * (weight.dim() - 2)
    if s.dim() >= 2 and s.shape[0] == 1 and s.numel() == weight.shape[1] and weight.shape[0] != 1:
        cols = weight.transpose(0, 1).reshape(weight.shape[1], -1)
        norm = cols.norm(dim=1).reshape(1, weight.shape[1], *extra)
        s = s.reshape(1, weight.shape[1], *extra)
    else:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], 1, *extra)
        s = s.reshape(weight.shape[0], 1, *extra)
    scale = s / (norm + torch.finfo(torch.float32).eps)
    if multiplier != 1:
        scale = multiplier * (scale - 1) + 1
    return weight * scale


def glora_delta(weight: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor,
                scale: float = 1.0) -> torch.Tensor:
    """GLoRA's delta ``scale * (W a1 a2 + b1 b2)`` in ``weight``'s shape: ``a1 (in, r)``, ``a2 (r, in)`` contract
    the input axis of ``W`` (kernel axes kept), ``b1 (out, r)``, ``b2 (r, in*k*k)`` are a LoCon pair."""
    w = weight.float()
    wa1 = a1.reshape(a1.shape[0], -1)
    wa2 = a2.reshape(a2.shape[0], -1)
    wb = (b1.reshape(b1.shape[0], -1) @ b2.reshape(b2.shape[0], -1)).reshape(w.shape)
    if w.dim() > 2:
        w_a = torch.einsum("o i ..., i j -> o j ...", w, wa1)
        w_a = torch.einsum("o i ..., i j -> o j ...", w_a, wa2)
    else:
        w_a = (w @ wa1) @ wa2
    return (wb + w_a) * scale


def _oft_rotations(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """Cayley rotations ``R = (I + Q)(I - Q)^-1`` of ``Q = B - B^T`` per block, ``||Q||_F`` (over every block)
    capped at ``constraint`` when it is positive (LyCORIS' ``get_r``)."""
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        q_norm = torch.norm(q) + 1e-8
        if q_norm > constraint:
            q = q * constraint / q_norm
    return (eye + q) @ (eye - q).inverse()


def oft_weight(weight: torch.Tensor, oft_blocks: torch.Tensor, constraint: float = 0.0,
               rescale: torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor:
    """Diagonal OFT's merged weight: for each block ``k`` of output rows ``W'_k = R_k^T W_k`` with
    ``R_k = m R + (1 - m) I``, then ``rescale`` row-wise. ``oft_blocks`` is ``(n_blocks, bs, bs)``;
    ``constraint`` is the absolute cap (LyCORIS: the file's alpha times the output size)."""
    w = weight.float()
    blocks = oft_blocks.float()
    n, bs = int(blocks.shape[0]), int(blocks.shape[1])
    r = _oft_rotations(blocks, constraint)
    if multiplier != 1:
        eye = torch.eye(bs, device=r.device, dtype=r.dtype)
        r = r * multiplier - multiplier * eye + eye
    rest = tuple(w.shape[1:])
    out = torch.einsum("k n m, k n ... -> k m ...", r, w.reshape(n, bs, *rest)).reshape(-1, *rest)
    if rescale is not None:
        out = rescale.float().reshape(out.shape[0], *[1] * len(rest)) * out
    return out


def boft_weight(weight: torch.Tensor, oft_blocks: torch.Tensor, constraint: float = 0.0,
                rescale: torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor:
    """Butterfly OFT's merged weight: ``oft_blocks (m, n_blocks, b, b)`` are ``m`` stages; stage ``i``
    permutes the output rows (groups of 2, stride ``2^i b / 2``), rotates each block by ``m R + (1 - m) I``
    and permutes back; then ``rescale`` row-wise (LyCORIS ``functional.boft.diff_weight`` plus ``W``)."""
    w = weight.float()
    blocks = oft_blocks.float()
    stages, b = int(blocks.shape[0]), int(blocks.shape[-1])
    eye = torch.eye(b, device=blocks.device, dtype=blocks.dtype)
    r = _oft_rotations(blocks, constraint)
    x = w
    for i in range(stages):
        bi = r[i]
        if multiplier != 1:
            bi = bi * multiplier + (1 - multiplier) * eye
        k = 2 ** i * (b // 2)
        x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        x = torch.einsum("b i j, b j ... -> b i ...", bi, x)
        x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    if rescale is not None:
        x = x * rescale.float().reshape(x.shape[0], *[1] * (x.dim() - 1))
    return x


# --------------------------------------------------------------------------------------------
# SVD


@dataclass
class SVDResult:
    """A (possibly truncated) SVD ``U diag(S) Vh`` of a delta matrix.

    ``total_sq`` is ``||delta||_F^2`` (so retained energy can be reported even when only some
    singular values were computed); ``exact`` is False for a randomized SVD.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    total_sq: float
    exact: bool = True
    method: str = "full"


def factor_space_is_cheaper(out: int, n: int, r: int) -> bool:
    """Rough flop counts: QRs + small core SVD versus product + dense SVD."""
    m = min(out, n)
    factor = 4.0 * r * r * (out + n) + 12.0 * r ** 3
    dense = 2.0 * out * n * r + 4.0 * out * n * m + 8.0 * m ** 3
    return factor < dense


def factor_svd(u: torch.Tensor, d: torch.Tensor, force: str | None = None) -> SVDResult:
    """Thin SVD of ``u @ d`` without forming it when that is cheaper.

    ``u = Qu Ru``, ``d.T = Qd Rd`` (reduced QR), so ``u @ d = Qu (Ru Rd^T) Qd^T``; the ``r x r``
    core is decomposed in float64 and the result has ``min(r, out, n)`` singular values: exactly
    the non-zero spectrum (plus round-off) of a rank-``r`` product.
    ``force`` is ``"factor"`` or ``"dense"`` to pick the path (tests, benchmarks).
    """
    u = u.float()
    d = d.float()
    out, r = u.shape
    n = d.shape[1]
    use_factor = factor_space_is_cheaper(out, n, r) if force is None else force == "factor"
    if not use_factor:
        res = dense_svd(u @ d)
        res.method = "dense"
        return res
    qu, ru = torch.linalg.qr(u)
    qd, rd = torch.linalg.qr(d.T)
    core = ru.double() @ rd.double().T
    uc, s, vch = torch.linalg.svd(core, full_matrices=False)
    big_u = qu @ uc.to(qu.dtype)
    vh = vch.to(qd.dtype) @ qd.T
    return SVDResult(big_u, s.float(), vh, float((s * s).sum()), exact=True, method="factor")


def dense_svd(w: torch.Tensor, rank: int | None = None, randomized: bool | str = "auto", niter: int = 4,
              oversample: int | None = None) -> SVDResult:
    """SVD of a dense delta matrix ``(out, n)``; randomized when ``rank`` is far below its size.

    With ``randomized="auto"`` a randomized SVD (Halko et al., ``torch.svd_lowrank`` with
    ``niter`` power iterations, ``q = rank + oversample``) is used when ``rank * 4 <= min(out, n)``
    and ``min(out, n) >= 256``; ``SVDResult.exact`` is then False and only ``q`` singular values
    are returned. ``total_sq`` is always the true ``||w||_F^2``.
    """
    w = w.float()
    m = min(w.shape)
    total_sq = float(w.double().pow(2).sum())
    if randomized == "auto":
        randomized = rank is not None and rank * 4 <= m and m >= 256
    if randomized and rank is not None:
        q = min(m, rank + (oversample if oversample is not None else max(rank, 8)))
        u, s, v = torch.svd_lowrank(w, q=q, niter=niter)
        return SVDResult(u, s, v.T, total_sq, exact=False, method="randomized")
    try:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    except RuntimeError:  # ill-conditioned input that LAPACK's default driver rejects: retry in float64
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        u, s, vh = u.float(), s.float(), vh.float()
    return SVDResult(u, s, vh, total_sq, exact=True, method="full")


def split_factors(res: SVDResult, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` of the best rank-``rank`` approximation, ``sqrt(S)`` on each side.

    Splitting the singular values evenly keeps both factors at the same magnitude, which is
    the safest choice for fp16/bf16 storage; the product is what matters to every loader.
    """
    k = min(rank, res.S.shape[0])
    root = res.S[:k].clamp_min(0).sqrt()
    up = res.U[:, :k] * root[None, :]
    down = root[:, None] * res.Vh[:k]
    return up, down


def quantile(values: torch.Tensor, q: float) -> float:
    """``torch.quantile(values, q)`` (linear interpolation between order statistics) for any number of values
    (``torch.quantile`` refuses inputs over 16M elements), through ``kthvalue``."""
    flat = values.reshape(-1)
    pos = q * (flat.numel() - 1)
    low = math.floor(pos)
    below = float(flat.kthvalue(low + 1).values)
    if pos == low:
        return below
    above = float(flat.kthvalue(low + 2).values)
    return below + (above - below) * (pos - low)


def clamped_factors(res: SVDResult, rank: int, clamp_quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` of rank ``rank`` with kohya's ``clamp_quantile`` outlier clamp, stored balanced.

    The clamp is kohya's: the singular values go into the up factor (``U diag(S)``, ``Vh``) and both are
    clamped to ``[-h, h]``, ``h`` the ``clamp_quantile`` quantile of their values together. Clamping the
    evenly split factors instead (``sqrt(S)`` on each side) cuts into many more of the entries that carry the
    change. Each rank component is then rescaled so its up column and down row have the same norm, which
    keeps the product and suits fp16/bf16 storage.
    """
    k = min(rank, res.S.shape[0])
    up = res.U[:, :k] * res.S[:k].clamp_min(0)[None, :]
    down = res.Vh[:k]
    hi = quantile(torch.cat([up.reshape(-1), down.reshape(-1)]), clamp_quantile)
    up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    up_norm, down_norm = up.norm(dim=0), down.norm(dim=1)
    scale = torch.where((up_norm > 0) & (down_norm > 0), (down_norm / up_norm.clamp_min(1e-30)).sqrt(),
                        torch.ones_like(up_norm))
    return up * scale[None, :], down / scale[:, None]


# --------------------------------------------------------------------------------------------
# rank choice


def select_rank(s: torch.Tensor, method: str, param: float | None, cap: int) -> int:
    """Number of singular values to keep, between 1 and ``min(cap, len(s))``.

    Resize methods keep the *smallest* rank that meets the target (kohya's ``resize_lora``
    keeps one more than that):

    * ``fixed``: ``cap``.
    * ``sv_ratio``: the values with ``S[0] / S[i] <= param`` (``param >= 1``).
    * ``sv_fro``: the smallest k with ``sqrt(sum(S[:k]^2) / sum(S^2)) >= param``.
    * ``sv_cumulative``: the smallest k with ``sum(S[:k]) / sum(S) >= param``.

    Extraction modes as LyCORIS defines them:

    * ``threshold``: ``count(S > param)``; ``ratio``: ``count(S > param * S[0])``;
    * ``quantile``: ``count(cumsum(S) < param * sum(S))`` (the values whose running sum is still
      below the target).

    A zero matrix gets rank 1.
    """
    s = s.detach().double().cpu().clamp_min(0)
    n = int(s.shape[0])
    cap = max(1, min(int(cap), n))
    if n == 0 or float(s[0]) <= 0.0:
        return 1
    tiny = 1e-12
    if method == "fixed":
        k = cap
    elif method == "sv_ratio":
        k = int((s * float(param) >= float(s[0]) * (1 - tiny)).sum())
    elif method in ("sv_fro", "sv_cumulative"):
        vals = s * s if method == "sv_fro" else s
        frac = torch.cumsum(vals, 0) / vals.sum()
        target = float(param) ** 2 if method == "sv_fro" else float(param)
        k = int((frac < target - tiny).sum()) + 1
    elif method == "threshold":
        k = int((s > float(param)).sum())
    elif method == "ratio":
        k = int((s > float(param) * float(s[0])).sum())
    elif method == "quantile":
        k = int((torch.cumsum(s, 0) < float(param) * float(s.sum()) * (1 - 1e-9)).sum())
    else:
        raise ValueError(f"unknown rank method {method!r}")
    return max(1, min(k, cap))


def retained_stats(res: SVDResult, rank: int) -> dict[str, float]:
    """What a rank-``rank`` truncation keeps: Frobenius fraction (``sqrt`` of energy), share of
    the sum of singular values, ``S[0] / S[rank-1]``, and the relative Frobenius error."""
    s = res.S.detach().double().cpu()
    k = min(rank, s.shape[0])
    kept_sq = float((s[:k] ** 2).sum())
    if res.exact:
        # every non-zero singular value is known: sum the tail (no cancellation in total - kept)
        tail_sq = float((s[k:] ** 2).sum())
        total_sq = kept_sq + tail_sq
    else:
        total_sq = max(res.total_sq, kept_sq)
        tail_sq = total_sq - kept_sq
    if total_sq <= 0.0:
        return {"fro": float("nan"), "sum": float("nan"), "max_ratio": float("nan"), "rel_error": 0.0}
    fro = math.sqrt(kept_sq / total_sq)
    ssum = float(s.sum())
    last = float(s[k - 1]) if k > 0 else 0.0
    return {
        "fro": fro,
        "sum": float(s[:k].sum()) / ssum if ssum > 0 and res.exact else float("nan"),
        "max_ratio": float(s[0]) / last if last > 0 else float("inf"),
        "rel_error": math.sqrt(max(tail_sq, 0.0) / total_sq),
    }
