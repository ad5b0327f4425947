"""Files the engine writes and reads: atomic writes (``atomic``), the LoRA file with its hashes (``lora_file``), the
kohya LoRA key names (``lora_keys``), the ``ss_*`` training metadata (``metadata``) and the user's ``modelspec.*``
keys (``user_metadata``).

May import only ``core``.
"""
