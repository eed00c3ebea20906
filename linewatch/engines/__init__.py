"""Inspection engines, registered by config ``kind``/``backend`` and imported lazily."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Engine

ENGINES: dict[str, tuple[str, str]] = {
    "zeroshot": ("linewatch.engines.zeroshot", "ZeroShotEngine"),
    "dqformer": ("linewatch.engines.dqformer", "DQFormerEngine"),
    "clip": ("linewatch.engines.clip", "ClipEngine"),
}


class EngineUnavailable(Exception):
    """The configured engine cannot be used (missing package, missing exported model, ...)."""


# engines whose exported models are optimised for the inspector's batch (TensorRT profiles)
BATCHED = ("zeroshot", "dqformer")


def create_engine(cfg, batch_size: int = 4) -> "Engine":
    """Build the engine named by ``cfg.kind`` (not yet warmed up); ``batch_size`` is the
    inspector's batch, which a TensorRT plan is built for (as `linewatch engines build` does)."""
    module_name, cls_name = ENGINES[cfg.kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineUnavailable(f"engine '{cfg.kind}' needs the package '{exc.name}', which is not "
                                f"installed") from None
    cls = getattr(module, cls_name)
    return cls(cfg, batch_size=batch_size) if cfg.kind in BATCHED else cls(cfg)
