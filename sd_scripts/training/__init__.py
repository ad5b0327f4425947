"""Training: preflight checks, the loop, its state and resume, noise and losses, optimizers and schedulers, sample
images, validation loss, callbacks and the loss plot.

The top layer of the engine: may import ``core``, ``files``, ``models``, ``data`` and ``networks``; only the entry
points (``sd_scripts/train_network.py`` ...) and the front end import it.
"""
