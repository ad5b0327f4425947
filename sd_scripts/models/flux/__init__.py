"""FLUX.1 (dev, schnell): the transformer in Black Forest Labs' layout, latent packing and key conversions."""
