"""Run diffusers' own FLUX.1 converters on the tiny FLUX model.

diffusers 0.42's BFL -> diffusers checkpoint converter (``convert_flux_transformer_checkpoint_to_diffusers``, used by
``FluxTransformer2DModel.from_single_file``) and its kohya-LoRA converter (``_convert_kohya_flux_lora_to_diffusers``,
used by ``FluxPipeline.load_lora_weights``) write FLUX.1's full widths into their source: ``inner_dim = 3072`` and
``dims=[3072, 3072, 3072, 12288]`` split the single blocks' fused ``linear1``. ``diffusers_flux_widths(hidden, mlp)``
compiles diffusers' own source of those two functions with the tiny model's widths in place of those literals (and
nothing else changed) and installs them where diffusers looks them up, for the duration of a ``with`` block. If
diffusers changes those lines the replacement fails loudly instead of testing something else.
"""

from __future__ import annotations

import inspect
import textwrap
from contextlib import contextmanager

__all__ = ["diffusers_flux_widths"]


def _recompiled(module, name: str, replacements: list[tuple[str, str]]):
    source = textwrap.dedent(inspect.getsource(getattr(module, name)))
    for old, new in replacements:
        if source.count(old) != 1:
            raise AssertionError(f"diffusers' {name} no longer contains {old!r} once; update this helper")
        source = source.replace(old, new)
    namespace: dict = {}
    exec(compile(source, module.__file__, "exec"), module.__dict__, namespace)  # noqa: S102 - diffusers' own source
    return namespace[name]


@contextmanager
def diffusers_flux_widths(hidden: int, mlp_hidden: int):
    from diffusers.loaders import lora_conversion_utils, lora_pipeline, single_file_model, single_file_utils

    checkpoint_fn = _recompiled(single_file_utils, "convert_flux_transformer_checkpoint_to_diffusers",
                                [("inner_dim = 3072", f"inner_dim = {hidden}"),
                                 ("mlp_ratio = 4.0", f"mlp_ratio = {mlp_hidden / hidden!r}")])
    lora_fn = _recompiled(lora_conversion_utils, "_convert_kohya_flux_lora_to_diffusers",
                          [("dims=[3072, 3072, 3072, 12288]", f"dims=[{hidden}, {hidden}, {hidden}, {mlp_hidden}]")])
    entry = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    saved = (entry["checkpoint_mapping_fn"], lora_pipeline._convert_kohya_flux_lora_to_diffusers)
    entry["checkpoint_mapping_fn"] = checkpoint_fn
    lora_pipeline._convert_kohya_flux_lora_to_diffusers = lora_fn
    try:
        yield
    finally:
        entry["checkpoint_mapping_fn"], lora_pipeline._convert_kohya_flux_lora_to_diffusers = saved
