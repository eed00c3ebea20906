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


def create_engine(cfg) -> "Engine":
    """Build the engine named by ``cfg.kind`` (not yet warmed up)."""
    module_name, cls_name = ENGINES[cfg.kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineUnavailable(f"engine '{cfg.kind}' needs the package '{exc.name}', which is not "
                                f"installed") from None
    return getattr(module, cls_name)(cfg)
