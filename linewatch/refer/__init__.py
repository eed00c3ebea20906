"""Referring industrial anomaly segmentation (RIAS / DQFormer): data, training, evaluation, inference.

- :mod:`linewatch.refer.data`: the referring JSON format and its builders;
- :mod:`linewatch.refer.train`: ``linewatch train dqformer | build-refer | eval``;
- :mod:`linewatch.refer.evaluate`: mIoU / overall IoU / precision@k and the wrong-sentence test;
- :class:`ReferringSegmenter` (in :mod:`linewatch.refer.predict`): ``predict(image, sentence) -> mask``.
"""

from __future__ import annotations

import argparse

from .predict import ReferringSegmenter

__all__ = ["ReferringSegmenter", "add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Plugin hook for ``linewatch train`` (subcommands ``dqformer``, ``build-refer``, ``eval``)."""
    from .train import add_train_arguments

    add_train_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Plugin hook for ``linewatch train``; returns the exit code."""
    from .train import run_train

    return run_train(args)
