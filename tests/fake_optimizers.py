"""An optimizer that behaves like a schedule-free one for the training loop's purposes (tests only).

Its ``eval()`` moves the parameters to different "evaluation" weights and ``train()`` moves them back
with a rounding error, as the real schedule-free optimizers do; ``calls`` records what the loop did.
"""

from __future__ import annotations

import torch


class AdamWScheduleFree(torch.optim.AdamW):
    calls: list[str] = []

    def __init__(self, params, lr=1e-3, **kwargs):
        super().__init__(params, lr=lr, **kwargs)
        self.mode = "train"

    @torch.no_grad()
    def eval(self):
        if self.mode == "train":
            for group in self.param_groups:
                for p in group["params"]:
                    p.mul_(1.5).add_(0.25)
        self.mode = "eval"
        AdamWScheduleFree.calls.append("eval")

    @torch.no_grad()
    def train(self):
        if self.mode == "eval":
            for group in self.param_groups:
                for p in group["params"]:
                    p.sub_(0.25).div_(1.5)
        self.mode = "train"
        AdamWScheduleFree.calls.append("train")
