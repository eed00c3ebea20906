"""Renders the shipped, fully commented config.toml from the config models, so the two cannot
drift (a test compares the file in the repository with this rendering).

``python -m linewatch.configdoc > config.toml`` rewrites it.
"""

from __future__ import annotations

import textwrap

from pydantic import BaseModel

from .config import (ClipEngine, Config, DQFormerEngine, GenicamSource, RecipePrompts, ReplaySource,
                     _toml_value)

HEADER = """\
# linewatch configuration.
#
# Every key is shown with its default. Keys marked (live) apply at once on reload
# (`systemctl reload linewatch`, SIGHUP, or `linewatch ctl reload`); keys marked (restart)
# restart their stage (source, engine), done by the daemon itself, or - for [daemon], [publish],
# [store] and [metrics] endpoints - need `systemctl restart linewatch`.
# Validate a change before reloading: `linewatch check-config config.toml`.
# This file is generated from the config models: python -m linewatch.configdoc > config.toml
"""

ALTERNATIVE_SOURCES = {
    "replay": ReplaySource(path="/srv/recordings/lot-0142"),  # type: ignore[arg-type]
    "genicam": GenicamSource(cti="/opt/mvIMPACT_Acquire/lib/x86_64/mvGenTLProducer.cti",  # type: ignore[arg-type]
                             nodes={"Width": 1280, "Height": 1024, "PixelFormat": "Mono8",
                                    "ExposureTime": 2000.0, "TriggerMode": "On"}),
}


ALTERNATIVE_ENGINES = {
    "dqformer (referring segmentation, outputs a mask: no threshold)": DQFormerEngine(
        checkpoint="var/dqformer/mt256_tags/last.pt",  # type: ignore[arg-type]
        recipes={"tile_a": RecipePrompts(product="magnetic tile", defects=["a crack", "a blowhole"])}),
    "clip (needs the 'clip' extra and a local CLIP folder)": ClipEngine(),
}


def _comment(text: str, indent: str = "") -> list[str]:
    return [f"{indent}# {ln}" for ln in textwrap.wrap(text, 92)]


def _section(name: str, model: BaseModel, commented: bool = False, doc: str = "") -> list[str]:
    pre = "# " if commented else ""
    out = []
    if doc:
        out += _comment(doc)
    out.append(f"{pre}[{name}]")
    tables = []
    for key, field in type(model).model_fields.items():
        value = getattr(model, key)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flag = "live" if extra.get("live") else "restart"
        if not commented:
            out += _comment(f"({flag}) {field.description or ''}")
        dumped = model.model_dump(mode="json")[key]
        if isinstance(dumped, dict):
            tables.append((key, dumped, field.description))
            continue
        if dumped is None:
            out.append(f"# {key} =   (not set)")
        else:
            out.append(f"{pre}{key} = {_toml_value(dumped)}")
    for key, dumped, _desc in tables:
        out.append(f"{pre}[{name}.{key}]")
        if not dumped and not commented:
            out.append("# (empty)")
        for k, v in dumped.items():
            out.append(f"{pre}{k} = {_toml_value(v)}")
    return out


def render_default() -> str:
    cfg = Config()
    lines = HEADER.splitlines()
    for name, field in Config.model_fields.items():
        lines.append("")
        lines += _comment(f"---- [{name}] {field.description}")
        lines += _section(name, getattr(cfg, name))
        if name == "source":
            for kind, alt in ALTERNATIVE_SOURCES.items():
                lines.append("")
                lines += _section("source", alt, commented=True,
                                  doc=f"Alternative: a {kind} source (replace the [source] table above).")
        if name == "engine":
            for kind, alt in ALTERNATIVE_ENGINES.items():
                lines.append("")
                lines += _section("engine", alt, commented=True,
                                  doc=f"Alternative: the {kind} engine (replace the [engine] table above).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_default(), end="")
