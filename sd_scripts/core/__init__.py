"""The shared core of the engine: user-error types (``errors``), the engine's settings (``config.TrainConfig``,
under kohya's argument names) and the quieting of third-party log noise (``quiet_logs``).

The lowest layer: it imports nothing from the rest of ``sd_scripts``.
"""
