"""The front end of ``main.py``: settings fields, command line, JSON files, the queue, the tag list.

Nothing in this package imports torch or diffusers at import time; the engine is imported only
when a training starts (``frontend.training``).
"""
