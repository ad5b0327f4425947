"""The dataset: the folder scan and plan (``dataset_layout`` over ``dataset_plan``, ``dataset_schema`` and
``dataset_scan``; ``dataset_finetune``), captions, images, buckets,
the training dataset itself (``dataset``), the latent and text-encoder caches, and the image downscaler.

Needs no model. May import ``core``, ``files`` and ``models``.
"""
