"""Frame sources, registered by config ``kind`` and imported lazily (see :func:`create_source`)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Source

# kind -> (module, class). Imported only when chosen, so a missing optional dependency
# (harvesters for genicam) is an error about that source alone.
SOURCES: dict[str, tuple[str, str]] = {
    "synthetic": ("linewatch.acquire.synthetic", "SyntheticLine"),
    "replay": ("linewatch.acquire.replay", "ReplayFolder"),
    "genicam": ("linewatch.acquire.genicam", "GenicamCamera"),
}


class SourceUnavailable(Exception):
    """The configured source cannot be used (missing package, missing producer file, ...)."""


def create_source(cfg) -> "Source":
    """Build the source named by ``cfg.kind`` (not yet opened)."""
    module_name, cls_name = SOURCES[cfg.kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SourceUnavailable(f"source '{cfg.kind}' needs the package '{exc.name}', which is not "
                                f"installed") from None
    return getattr(module, cls_name)(cfg)
