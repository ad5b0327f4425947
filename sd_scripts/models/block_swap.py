"""``blocks_to_swap``: frozen transformer blocks that live in CPU memory and visit the compute device only to run.

Model-agnostic: :class:`BlockSwap` takes the blocks in the order the model runs them and the indices of those to
swap; the others stay on the device. A swapped block's weights stay in CPU memory (pinned on CUDA, so the copies are
asynchronous); its parameters point at that CPU copy while it waits and at a device copy while it runs. Module hooks
do the work, so the model's code does not change:

* forward: when block ``j`` starts, its copy is made current (waiting for the copy if it is still in flight) and the
  copy of the next ``prefetch`` swapped blocks is started on a side CUDA stream, overlapped with block ``j``'s
  compute; when ``j`` ends its device copy is dropped (frozen weights need no copy back);
* backward: a hook on each block's outputs fires when the gradient of those outputs is complete, which is when the
  block's own backward (and, with gradient checkpointing, its recomputed forward) is about to run. Autograd runs a
  later block's backward before an earlier one's, so the hook drops the device copies of the blocks after ``j``,
  makes ``j`` current and prefetches the swapped blocks before it. When the backward pass ends every swapped block is
  back on the CPU.

So at most ``1 + prefetch`` swapped blocks are on the device at any moment, each swapped block crosses once per
forward and once per backward (only CPU -> device: 2 x N block copies per step), and results are bit-identical to no
swap: the same weights, moved. Without CUDA the "device copy" is a plain copy in RAM (tests use it; training
without CUDA has nothing to save and the loop does not turn this on).

kohya's ``ModelOffloader`` keeps a fixed number of blocks on the device and swaps weights between pairs of blocks in a
worker thread; the device memory is the same within one block, and this one needs no thread.

Every parameter of a swapped block must be frozen (LoRA modules live outside the blocks); a trainable one is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["BlockSwap", "swap_order"]


def swap_order(num_blocks: int, count: int) -> list[int]:
    """Which ``count`` of ``num_blocks`` blocks (in run order) to swap: the middle of the run, never the first or the
    last block, so the first swapped block's copy overlaps the first block's compute in the forward pass and the last
    block, whose backward starts right after the forward, is already there.

    ``count`` may be at most ``num_blocks - 2``."""
    if count < 0 or count > max(0, num_blocks - 2):
        raise ValueError(f"cannot swap {count} of {num_blocks} blocks (at most {max(0, num_blocks - 2)})")
    return list(range(1, 1 + count))


def _tensors(block: torch.nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in list(block.parameters()) + list(block.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _output_tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _output_tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _output_tensors(item)]
    return []


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class BlockSwap:
    """Swap ``blocks[i]`` for every ``i`` in ``swapped`` between CPU memory and ``device`` (see the module docstring).

    The other blocks are moved to ``device``. ``trace`` records the moves as ``("fetch", i)`` (copy started),
    ``("in", i)`` (block ``i`` runs on its device copy) and ``("park", i)`` (back on the CPU copy). :meth:`remove`
    takes the hooks off and leaves every block on the device."""

    def __init__(self, blocks: Sequence[torch.nn.Module], swapped: Iterable[int], device, *, prefetch: int = 1,
                 pin_memory: bool | None = None, trace: bool = False):
        self.blocks = list(blocks)
        self.swapped = sorted(set(int(i) for i in swapped))
        if any(i < 0 or i >= len(self.blocks) for i in self.swapped):
            raise ValueError(f"swapped block indices {self.swapped} outside 0..{len(self.blocks) - 1}")
        if prefetch < 0:
            raise ValueError("prefetch must be 0 or more")
        self.device = torch.device(device)
        self.prefetch = int(prefetch)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        pin = self.cuda if pin_memory is None else bool(pin_memory and self.cuda)
        self.trace: list[tuple[str, int]] | None = [] if trace else None
        self._homes: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._pending: dict[int, tuple[list[torch.Tensor], object]] = {}  # copies in flight: tensors, event
        self._active: set[int] = set()  # swapped blocks whose parameters point at a device copy
        self._backward_started: set[int] = set()
        self._callback_queued = False
        swapped_set = set(self.swapped)
        for i, block in enumerate(self.blocks):
            if i not in swapped_set:
                block.to(self.device)
                continue
            trainable = [n for n, p in block.named_parameters() if p.requires_grad]
            if trainable:
                raise ValueError(f"block {i} has trainable parameters ({trainable[0]}, ...): only frozen blocks can "
                                 "be swapped")
            pairs = []
            for t in _tensors(block):
                home = t.detach().to("cpu")
                if pin:
                    try:
                        home = home.pin_memory()
                    except RuntimeError:  # page-locked memory is limited on some systems: copies are then synchronous
                        pass
                t.data = home
                pairs.append((t, home))
            self._homes[i] = pairs
        self._handles = []
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._make_pre_hook(i)))
            self._handles.append(block.register_forward_hook(self._make_post_hook(i)))

    # ------------------------------------------------------------------ moves
    def _log(self, what: str, i: int) -> None:
        if self.trace is not None:
            self.trace.append((what, i))

    def _fetch(self, i: int) -> None:
        """Start copying swapped block ``i`` to the device (on the side stream on CUDA)."""
        if i in self._pending or i in self._active:
            return
        homes = [home for _, home in self._homes[i]]
        if self.cuda:
            with torch.cuda.stream(self.stream):
                copies = [home.to(self.device, non_blocking=True) for home in homes]
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            copies = [home.to(self.device, copy=True) for home in homes]
            event = None
        self._pending[i] = (copies, event)
        self._log("fetch", i)

    def _activate(self, i: int) -> None:
        """Point block ``i``'s tensors at its device copy, after the copy has finished."""
        if i in self._active:
            return
        self._fetch(i)
        copies, event = self._pending.pop(i)
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for c in copies:
                c.record_stream(stream)  # the memory is not reused before the compute stream is done with it
        for (t, _), c in zip(self._homes[i], copies):
            t.data = c
        self._active.add(i)
        self._log("in", i)

    def _park(self, i: int) -> None:
        """Point block ``i``'s tensors back at the CPU copy (the device copy is freed once no kernel needs it)."""
        if i not in self._active:
            return
        for t, home in self._homes[i]:
            t.data = home
        self._active.discard(i)
        self._log("park", i)

    def _prefetch_after(self, j: int, step: int) -> None:
        ahead = [i for i in self.swapped if (i > j if step > 0 else i < j)]
        if step < 0:
            ahead.reverse()
        for i in ahead[: self.prefetch]:
            self._fetch(i)

    # ------------------------------------------------------------------ hooks
    def _make_pre_hook(self, j: int):
        def pre_hook(module, args):
            if _in_backward():  # a recomputation inside backward: the backward hook brought the block in
                if j in self._homes:
                    self._activate(j)
                return None
            for i in list(self._active):
                if i != j:
                    self._park(i)  # left over from a pass that stopped early
            if j in self._homes:
                self._activate(j)
            self._prefetch_after(j, +1)
            return None

        return pre_hook

    def _make_post_hook(self, j: int):
        def post_hook(module, args, output):
            if _in_backward():
                return None
            outputs = [t for t in _output_tensors(output) if t.requires_grad]
            if outputs and torch.is_grad_enabled():
                for t in outputs:
                    t.register_hook(self._make_backward_hook(j))
            if j in self._homes:
                self._park(j)
            return None

        return post_hook

    def _make_backward_hook(self, j: int):
        def backward_hook(grad):
            self._backward_starts(j)
            return None

        return backward_hook

    def _backward_starts(self, j: int) -> None:
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
            self._callback_queued = True
        if j in self._backward_started:
            return
        self._backward_started.add(j)
        for i in list(self._active):
            if i > j:
                self._park(i)  # autograd has finished the backward of every later block
        if j in self._homes:
            self._activate(j)
        self._prefetch_after(j, -1)

    def _backward_done(self) -> None:
        for i in list(self._active):
            self._park(i)
        self._pending.clear()
        self._backward_started.clear()
        self._callback_queued = False

    # ------------------------------------------------------------------ info
    def on_device(self) -> list[int]:
        """Swapped blocks whose parameters point at a device copy now."""
        return sorted(self._active)

    def remove(self) -> None:
        """Take the hooks off; every block ends up on the device."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for i in list(self._homes):
            self._activate(i)
        self._homes.clear()
        self._active.clear()
