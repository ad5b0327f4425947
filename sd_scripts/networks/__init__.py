"""LoRA networks and the LoRA tools: the kohya LoRA/LoCon and DyLoRA modules, the LyCORIS adapter, network
arguments and block weights, and the resize / merge / extract math (pure tensor functions in ``lora_math``,
state-dict transforms in ``network_state``, ``resize``, ``merge``, ``extract``, ``lycoris_merge``).

May import ``core``, ``files``, ``models`` and ``data``; never ``training``.
"""
