"""The shared core of the engine: user-error types (``errors``), the declaration of every setting (``setting``,
``settings``), the engine's settings made from it (``config.TrainConfig``, under kohya's argument names) and the
quieting of third-party log noise (``quiet_logs``).

The lowest layer: it imports nothing from the rest of ``sd_scripts``.
"""
