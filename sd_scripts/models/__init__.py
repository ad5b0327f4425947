"""Model families and loading: the family registry with each family's facts and hooks (``families``), loading
single-file checkpoints and diffusers folders (``loading``), the diffusers <-> LDM key conversion (``ldm_convert``,
``sdxl_names``) and prompt encoding (``text_encoding``).

May import ``core`` and ``files``.
"""
