"""The dataset: the folder scan and plan (``dataset_layout``, ``dataset_finetune``), captions, images, buckets,
the training dataset itself (``dataset``), the latent and text-encoder caches, and the image downscaler.

Needs no model. May import ``core``, ``files`` and ``models``.
"""
