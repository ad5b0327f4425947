"""What the training loop needs from a network: the :class:`TrainableNetwork` protocol.

Every network :func:`sd_scripts.networks.factory.build_network` returns implements it: ``LoRANetwork``
(:mod:`.lora_network`, LoRA/LoCon), ``DyLoRANetwork`` (:mod:`.dylora`) and ``LycorisNetworkAdapter``
(:mod:`.lycoris_network`).
The loop calls nothing else on a network, so a new network kind never touches the loop.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

__all__ = ["TrainableNetwork"]


@runtime_checkable
class TrainableNetwork(Protocol):
    # torch.nn.Module's own: device and precision, train/eval mode, the trainable tensors, the full-precision state
    # a training state saves and resume loads
    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def parameters(self, recurse: bool = True) -> Iterator[Any]: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any: ...

    def prepare_optimizer_params(self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None,
                                 default_lr: float | None) -> tuple[list[dict], list[str]]:
        """The optimizer's parameter groups (without the ones at lr 0) and a name for each (for logs and the plot)."""
        ...

    def kohya_state_dict(self) -> dict[str, Any]:
        """The tensors of the LoRA file, under kohya's key names."""
        ...

    def supports_max_norm(self) -> bool:
        """Whether :meth:`apply_max_norm_regularization` works for this network (``scale_weight_norms``)."""
        ...

    def apply_max_norm_regularization(self, max_norm_value: float, device: Any = None) -> tuple[int, float, float]:
        """Scale down the modules whose delta weight's norm is above the limit: (keys scaled, mean norm, max norm)."""
        ...
