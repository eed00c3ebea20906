"""Referring industrial anomaly segmentation (RIAS / DQFormer): data, training, evaluation, inference.

- :mod:`linewatch.refer.data`: the referring JSON format and its builders;
- :mod:`linewatch.refer.train`: ``linewatch train dqformer`` and ``linewatch train build-refer``;
- :mod:`linewatch.refer.evaluate`: mIoU / overall IoU / precision@k and the wrong-sentence test;
- :class:`ReferringSegmenter` (in :mod:`linewatch.refer.predict`): ``predict(image, sentence) -> mask``.
"""

from .predict import ReferringSegmenter

__all__ = ["ReferringSegmenter"]
