"""blocks_to_swap, gradient checkpointing (with CPU offload) and fp8 storage on a small two-stream transformer.

On a CPU there is no second device, so a swapped block's "device copy" is a separate copy in RAM and the CPU copy it
waits in is poisoned with NaN while it waits (``PoisonedSwap``): a block that computed, or whose weights the backward
pass used, while it was not brought in would turn the loss or the gradients into NaN, and the results are compared
bit for bit with the model run without swapping. The trace of moves shows each copy starts before the block that
needs it begins (overlap) and that no more than 1 + prefetch swapped blocks are on the device at once."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sd_scripts.models.block_swap import BlockSwap, swap_order
from sd_scripts.models.checkpointing import checkpoint_blocks, uncheckpoint_blocks
from sd_scripts.models.fp8 import FP8_DTYPE, Fp8Linear, store_linear_weights_fp8

D = 16


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim))

    def forward(self, x):
        rrms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return (x.float() * rrms * self.scale.float()).to(x.dtype)


class DoubleBlock(nn.Module):
    """Two streams (img, txt) and a conditioning vector, as FLUX's double blocks."""

    def __init__(self):
        super().__init__()
        self.img_mod = nn.Linear(D, 2 * D)
        self.img_qkv = nn.Linear(D, 3 * D)
        self.txt_qkv = nn.Linear(D, 3 * D)
        self.img_mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.norm = RMSNorm(D)

    def forward(self, img, txt, vec):
        shift, scale = self.img_mod(vec).unsqueeze(1).chunk(2, dim=-1)
        x = torch.cat([txt, img], dim=1)
        q, k, v = torch.cat([self.txt_qkv(x[:, :txt.shape[1]]), self.img_qkv(x[:, txt.shape[1]:])], 1).chunk(3, -1)
        attn = torch.softmax(q @ k.transpose(1, 2) / D ** 0.5, dim=-1) @ v
        txt = txt + attn[:, :txt.shape[1]]
        img = img + attn[:, txt.shape[1]:]
        img = img + self.img_mlp(self.norm(img) * (1 + scale) + shift)
        return img, txt


class SingleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1 = nn.Linear(D, 3 * D)
        self.linear2 = nn.Linear(3 * D, D)
        self.modulation = nn.Linear(D, D)

    def forward(self, x, vec):
        return x + self.linear2(torch.tanh(self.linear1(x))) * torch.sigmoid(self.modulation(vec)).unsqueeze(1)


class TinyTwoStream(nn.Module):
    def __init__(self, double=3, single=4):
        super().__init__()
        self.img_in = nn.Linear(8, D)
        self.txt_in = nn.Linear(8, D)
        self.vec_in = nn.Linear(4, D)
        self.double_blocks = nn.ModuleList(DoubleBlock() for _ in range(double))
        self.single_blocks = nn.ModuleList(SingleBlock() for _ in range(single))
        self.final = nn.Linear(D, 8)

    def blocks(self):
        return list(self.double_blocks) + list(self.single_blocks)

    def forward(self, img, txt, y):
        img, txt, vec = self.img_in(img), self.txt_in(txt), self.vec_in(y)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec)
        x = torch.cat([txt, img], 1)
        for block in self.single_blocks:
            x = block(x, vec)
        return self.final(x[:, txt.shape[1]:])


class Adapters(nn.Module):
    """Trainable low-rank adapters on every Linear of the blocks, living outside the blocks (as LoRA modules do)."""

    def __init__(self, model):
        super().__init__()
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        for block in model.blocks():
            for layer in block.modules():
                if isinstance(layer, nn.Linear):
                    down, up = nn.Linear(layer.in_features, 2, bias=False), nn.Linear(2, layer.out_features, bias=False)
                    nn.init.normal_(up.weight, std=0.1)
                    self.down.append(down)
                    self.up.append(up)
                    layer.register_forward_hook(lambda m, a, out, d=down, u=up: out + u(d(a[0])))


def build(seed=0, double=3, single=4):
    torch.manual_seed(seed)
    model = TinyTwoStream(double, single)
    model.requires_grad_(False)
    adapters = Adapters(model)
    return model, adapters


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 6, 8, generator=g), torch.randn(2, 3, 8, generator=g), torch.randn(2, 4, generator=g))


def step(model, adapters, inputs):
    out = model(*inputs)
    loss = out.pow(2).mean()
    loss.backward()
    grads = [p.grad.clone() for p in adapters.parameters()]
    adapters.zero_grad(set_to_none=True)
    return loss.detach(), out.detach(), grads


class PoisonedSwap(BlockSwap):
    """A swapped block waits in a NaN-filled copy: any use of it there shows in the results."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_on_device = 0
        for i in self.swapped:
            self._park_poisoned(i)

    def _park_poisoned(self, i):
        for t, home in self._homes[i]:
            t.data = torch.full_like(home, float("nan"))

    def _activate(self, i):
        super()._activate(i)
        self.max_on_device = max(self.max_on_device, len(self._active) + len(self._pending))

    def _fetch(self, i):
        super()._fetch(i)
        self.max_on_device = max(self.max_on_device, len(self._active) + len(self._pending))

    def _park(self, i):
        was = i in self._active
        super()._park(i)
        if was:
            self._park_poisoned(i)


def _assert_same(a, b):
    loss_a, out_a, grads_a = a
    loss_b, out_b, grads_b = b
    assert torch.isfinite(loss_a)
    assert torch.equal(loss_a, loss_b) and torch.equal(out_a, out_b)
    assert len(grads_a) == len(grads_b) and all(torch.equal(x, y) for x, y in zip(grads_a, grads_b))


@pytest.mark.parametrize("checkpointing", ["off", "on", "cpu_offload"])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_block_swap_runs_each_block_on_its_device_copy_and_changes_nothing(checkpointing, prefetch):
    model, adapters = build()
    reference = step(model, adapters, batch())
    if checkpointing != "off":
        checkpoint_blocks(model.blocks(), cpu_offload=checkpointing == "cpu_offload")
    swapped = swap_order(len(model.blocks()), 4)
    swap = PoisonedSwap(model.blocks(), swapped, "cpu", prefetch=prefetch, trace=True)
    for _ in range(2):  # a second step starts from the state the first left
        swap.trace.clear()
        _assert_same(reference, step(model, adapters, batch()))
        assert swap.on_device() == [] and swap._pending == {}
        ins = [i for what, i in swap.trace if what == "in"]
        fetches = [i for what, i in swap.trace if what == "fetch"]
        # each swapped block comes in once in the forward pass (in run order) and once in the backward (reversed)
        assert ins == swapped + swapped[::-1]
        assert fetches == ins
        assert [i for what, i in swap.trace if what == "park"] == swapped + swapped[::-1]
    assert swap.max_on_device <= 1 + prefetch
    if prefetch:
        # the copy of each swapped block starts before the block before it has finished: overlapped with its compute
        trace = swap.trace
        for k, i in enumerate(swapped[1:], 1):
            assert trace.index(("fetch", i)) < trace.index(("park", swapped[k - 1]))


def test_block_swap_in_inference_and_after_remove():
    model, adapters = build()
    with torch.no_grad():
        expected = model(*batch())
    swap = PoisonedSwap(model.blocks(), [1, 2, 3, 4, 5], "cpu", prefetch=1, trace=True)
    with torch.no_grad():
        assert torch.equal(model(*batch()), expected)
    assert swap.on_device() == []
    assert [i for what, i in swap.trace if what == "in"] == [1, 2, 3, 4, 5]
    swap.remove()  # every block on the device, the hooks gone
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(*batch()), expected)


def test_block_swap_refuses_trainable_blocks_and_bad_counts():
    model, _ = build()
    model.single_blocks[0].linear1.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable"):
        BlockSwap(model.blocks(), [3], "cpu")
    with pytest.raises(ValueError, match="at most 5"):
        swap_order(7, 6)
    assert swap_order(7, 0) == [] and swap_order(7, 5) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("cpu_offload", [False, True])
def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_gradients(cpu_offload):
    model, adapters = build()
    reference = step(model, adapters, batch())
    checkpoint_blocks(model.blocks(), cpu_offload=cpu_offload)
    calls = []
    hooks = [b.register_forward_hook(lambda m, a, o: calls.append(1)) for b in model.blocks()]
    forwards = []
    for block in model.blocks():  # the block's own forward runs once in the forward pass and once more in backward
        original = block._forward_before_checkpointing

        def counted(*args, _original=original, **kwargs):
            forwards.append(1)
            return _original(*args, **kwargs)

        block._forward_before_checkpointing = counted
    checkpoint_blocks(model.blocks(), cpu_offload=cpu_offload)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = step(model, adapters, batch())
    _assert_same(reference, result)
    assert len(calls) == len(model.blocks())
    assert len(forwards) == 2 * len(model.blocks())
    if cpu_offload:
        # the outer hooks see nothing of the blocks: what a checkpointed block keeps is packed by the CPU offload
        inside = sum(sum(p.numel() for p in b.parameters()) for b in model.blocks())
        assert sum(t.numel() for t in packed) < inside
    for h in hooks:
        h.remove()
    uncheckpoint_blocks(model.blocks())
    assert all("forward" not in b.__dict__ for b in model.blocks())
    forwards.clear()
    _assert_same(reference, step(model, adapters, batch()))


def test_fp8_storage_computes_in_the_input_dtype_and_keeps_float8_weights():
    model, adapters = build()
    fp8_model = copy.deepcopy(model)
    count = store_linear_weights_fp8(fp8_model)
    layers = [m for m in fp8_model.modules() if isinstance(m, Fp8Linear)]
    assert count == len(layers) == sum(isinstance(m, nn.Linear) for m in model.modules())
    assert all(m.weight.dtype == FP8_DTYPE for m in layers)
    assert all(m.bias.dtype == torch.float32 for m in layers)
    assert fp8_model.double_blocks[0].norm.scale.dtype == torch.float32
    # the same as the float32 model with its Linear weights rounded to float8
    rounded = copy.deepcopy(model)
    for m in rounded.modules():
        if isinstance(m, nn.Linear):
            m.weight.data = m.weight.data.to(FP8_DTYPE).float()
    inputs = batch()
    with torch.no_grad():
        assert torch.equal(fp8_model(*inputs), rounded(*inputs))
    # and it trains: gradients reach inputs through the float8 layers
    layer = layers[0]
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    expected = torch.ones(3, layer.out_features) @ layer.weight.float()
    assert torch.allclose(x.grad, expected)
    # bf16 compute under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, layer.in_features)).dtype == torch.bfloat16


def test_fp8_storage_with_block_swap_and_checkpointing_matches_fp8_alone():
    model, adapters = build()
    store_linear_weights_fp8(model, keep=lambda name, layer: name in ("img_in", "txt_in", "vec_in", "final"))
    assert model.img_in.weight.dtype == torch.float32 and model.single_blocks[0].linear1.weight.dtype == FP8_DTYPE
    reference = step(model, adapters, batch())
    checkpoint_blocks(model.blocks())
    swap = PoisonedSwap(model.blocks(), swap_order(len(model.blocks()), 5), "cpu", trace=True)
    _assert_same(reference, step(model, adapters, batch()))
    assert all(t.dtype == FP8_DTYPE for i in swap.swapped for t, home in swap._homes[i] if t.dim() == 2)


def test_fp8_storage_refuses_trainable_weights_and_layers_with_a_network():
    layer = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="frozen"):
        store_linear_weights_fp8(layer)
    layer.requires_grad_(False)
    layer.forward = lambda x: x  # what LoRA's apply_to does
    with pytest.raises(ValueError, match="already attached"):
        store_linear_weights_fp8(layer)
