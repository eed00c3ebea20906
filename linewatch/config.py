"""Pydantic models of config.toml (unknown keys rejected), the loader and its error report.

Each field carries a description, and a ``live`` flag in its schema extras: live keys apply on
reload at once; the others need a restart of their stage, which the daemon does itself.
"""

from __future__ import annotations

import re
import sys
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


def live(description: str, **kw: Any) -> Any:
    """A field that reloads live (applies at once on SIGHUP / `reload`)."""
    return Field(description=description, json_schema_extra={"live": True}, **kw)


def restart(description: str, **kw: Any) -> Any:
    """A field whose change restarts its stage on reload."""
    return Field(description=description, json_schema_extra={"live": False}, **kw)


class Strict(BaseModel):
    # no inf / nan anywhere: an infinite timeout reaches Queue.get / Thread.join and kills the thread
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


DEVICE_PATTERN = r"^(cpu|cuda(:[0-9]+)?)$"
ENDPOINT_PATTERN = r"^(tcp://(\[[0-9A-Fa-f:.]+\]|[^:/\s\[\]]+):([0-9]{1,5}|\*)|ipc://\S+|inproc://\S+)$"
PATTERN_MEANING = {DEVICE_PATTERN: "not a torch device (cpu, cuda, cuda:N)",
                   ENDPOINT_PATTERN: "not a ZeroMQ endpoint (tcp://host:port, ipc://path)"}


# ---------------------------------------------------------------------------------------- daemon
class DaemonConfig(Strict):
    line: str = restart("Name of the production line; part of every ZeroMQ topic.", default="line1",
                        pattern=r"^[A-Za-z0-9_-]+$")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = live("Logging level.", default="INFO")
    stage_stale_s: float = live("A stage whose heartbeat is older than this stops the systemd "
                                "watchdog pings (so systemd restarts a hung daemon).", default=10.0, gt=0)
    tier2_stale_s: float = live("The lot closer inside one lot's tier 2 (whole-lot scoring, "
                                "refinement: tens of seconds for a large lot on a CPU) counts as hung "
                                "only after this long.", default=300.0, gt=0)
    drain_timeout_s: float = live("On stop, how long to wait for in-flight frames to be inspected "
                                  "before the rest are published NOT_INSPECTED.", default=10.0, ge=0)


# --------------------------------------------------------------------------------------- sources
class SyntheticSource(Strict):
    kind: Literal["synthetic"] = "synthetic"
    camera: str = restart("Camera name reported in results.", default="synthetic0")
    width: int = restart("Frame width in pixels.", default=256, ge=32, le=8192)
    height: int = restart("Frame height in pixels.", default=256, ge=32, le=8192)
    channels: Literal[1, 3] = restart("1 = mono, 3 = RGB.", default=3)
    fps: float = restart("Frames per second; 0 = as fast as the pipeline takes them.", default=20.0, ge=0)
    defect_rate: float = restart("Fraction of parts that get a defect pasted in.", default=0.15, ge=0, le=1)
    defect_kinds: list[Literal["scratch", "spot", "crack", "missing"]] = restart(
        "Kinds of defect drawn at random.", default=["scratch", "spot", "crack", "missing"], min_length=1)
    product: Literal["brushed_metal", "woven", "speckled"] = restart(
        "Surface texture of the simulated parts.", default="brushed_metal")
    seed: int = restart("Random seed; the same seed gives the same line.", default=0, ge=0)
    n_frames: int = restart("Stop after this many frames; 0 = run forever.", default=0, ge=0)


class ReplaySource(Strict):
    kind: Literal["replay"] = "replay"
    camera: str = restart("Camera name reported in results.", default="replay0")
    path: Path = restart("Folder of images: flat, MVTec-style test/<kind>/ with ground_truth/<kind>/, "
                         "or the shared data layouts (<item>/PartK.jpg, <kind>/<name>.jpg).")
    fps: float = restart("Frames per second; 0 = as fast as possible.", default=0.0, ge=0)
    loop: bool = restart("Start again at the end of the folder.", default=False)
    width: int = restart("Resize every image to this width (0 = keep the first image's size).",
                         default=0, ge=0, le=8192)
    height: int = restart("Resize every image to this height (0 = keep the first image's size).",
                          default=0, ge=0, le=8192)
    channels: Literal[1, 3] = restart("1 = mono, 3 = RGB.", default=3)
    shuffle_seed: int | None = restart("Shuffle the files once with this seed; None keeps sorted order.",
                                       default=None)
    bit_depth: Literal[0, 10, 12, 14, 16] = restart(
        "Significant bits of images stored with more than 8 (a Mono12 recording in 16-bit PNG/TIFF: "
        "12); they are scaled to 8 bits from this full scale. 0 = the file's own depth.", default=0)


class GenicamSource(Strict):
    kind: Literal["genicam"] = "genicam"
    camera: str = restart("Camera name reported in results.", default="cam0")
    cti: Path = restart("Path to the GenTL producer (.cti file).")
    device_index: int = restart("Which device of the producer to open when no serial is given.",
                                default=0, ge=0)
    serial: str | None = restart("Open the device with this serial number.", default=None)
    nodes: dict[str, str | int | float | bool] = restart(
        "GenICam feature nodes to set at start, in order (Width, Height, PixelFormat, ExposureTime, "
        "TriggerMode, AcquisitionFrameRate, ...). A node the camera lacks is a startup error.",
        default_factory=dict)
    buffer_count: int = restart("Number of GenTL buffers announced to the producer.", default=8, ge=1, le=256)
    fetch_timeout_s: float = restart("How long to wait for one buffer before checking the camera.",
                                     default=1.0, gt=0)
    software_trigger_fps: float = restart(
        "If > 0, fire TriggerSoftware at this rate (for cameras in trigger mode without a PLC).",
        default=0.0, ge=0)
    reopen_backoff_s: tuple[float, float] = restart(
        "Backoff when the camera vanishes: first and longest wait between reopen tries.",
        default=(0.5, 10.0))
    line_value_node: str | None = restart(
        "Chunk or node read with each frame for the `line` lot policy (e.g. ChunkLineStatusAll).",
        default=None)
    width: int = restart("Resize frames to this width (0 = keep the camera's size).", default=0, ge=0)
    height: int = restart("Resize frames to this height (0 = keep the camera's size).", default=0, ge=0)
    channels: Literal[1, 3] = restart("1 = mono, 3 = RGB (mono is replicated).", default=3)


SourceConfig = Annotated[Union[SyntheticSource, ReplaySource, GenicamSource], Field(discriminator="kind")]


# ------------------------------------------------------------------------------------------ ring
class RingConfig(Strict):
    slots: int = restart("Preallocated frame slots.", default=32, ge=2, le=4096)
    policy: Literal["block", "drop_oldest", "drop_newest"] = restart(
        "When the ring is full: block = the source waits (camera buffers absorb it, then the camera "
        "drops); drop_oldest = the oldest waiting frame is dropped (freshest frames win); drop_newest "
        "= the new frame is dropped. Every drop is counted and published NOT_INSPECTED.",
        default="drop_oldest")
    block_timeout_s: float = restart("With policy=block, how long the source may wait for a free slot "
                                     "before the frame is dropped.", default=1.0, gt=0)


# ------------------------------------------------------------------------------------------ lots
class LotsConfig(Strict):
    policy: Literal["count", "idle", "control", "line"] = live(
        "How lots open and close: count = every part_count frames; idle = a gap of idle_gap_s "
        "without frames; control = only `lot start`/`lot end` on the control socket; line = the "
        "GenICam line/chunk value changes. A control message always wins.", default="count")
    part_count: int = live("Frames per lot for policy=count.", default=32, ge=1)
    idle_gap_s: float = live("Gap that closes a lot for policy=idle (and a safety net for all "
                             "policies when > 0).", default=0.0, ge=0)
    recipe: str = live("Recipe / product name given to lots opened automatically.", default="default")
    id_prefix: str = live("Prefix of automatically generated lot ids.", default="lot")


# ---------------------------------------------------------------------------------------- engine
class ZeroShotEngine(Strict):
    kind: Literal["zeroshot"] = "zeroshot"
    backend: Literal["torch", "onnxruntime", "tensorrt"] = restart(
        "Where the backbone runs. onnxruntime and tensorrt load an exported model from engines_dir.",
        default="torch")
    device: str = restart("torch device (cpu, cuda, cuda:0).", default="cpu", pattern=DEVICE_PATTERN)
    backbone: Literal["efficientnet_lite0"] = restart("Feature extractor (real ImageNet weights).",
                                                      default="efficientnet_lite0")
    input_size: int = restart("Shorter side the frame is resized to before feature extraction.",
                              default=256, ge=64, le=2048)
    tile: bool = restart("Keep aspect ratio: tall or wide frames are scored in square tiles.",
                         default=True)
    reference_frames: int = restart("How many other frames (this lot so far, then the previous lot) "
                                    "each frame is compared with.", default=8, ge=1, le=256)
    topk_fraction: float = restart("A patch's score is the mean of its smallest this-fraction of "
                                   "per-reference nearest distances (robust to defective references).",
                                   default=0.3, gt=0, le=1)
    feature_dim: int = restart("Patch features are projected to this many dimensions (0 = keep all).",
                               default=0, ge=0)
    threads: int = restart("CPU threads for the engine (0 = all cores).", default=0, ge=0)
    tier2_references: int = restart(
        "Tier 2 (lot end): how many other frames of the lot each frame is compared with, spread over "
        "the lot. Tier-2 cost grows with this; the default keeps up with a lot of 32 every 1.6 s on "
        "2 CPU cores. A GPU box can afford 32 and stride 1 (slightly better maps).", default=16, ge=1, le=256)
    tier2_ref_stride: int = restart(
        "Tier 2: keep every n-th reference patch in each direction (1 = all; 2 = a quarter, about 4x "
        "cheaper).", default=2, ge=1, le=4)
    border_bands: int = restart(
        "Tier 2: calibrate this many rings of grid cells at the frame edge against the interior of "
        "the same lot (edge patches score high on every frame; each ring's median and 90th "
        "percentile over the lot are mapped onto the interior's). 0 = off. Measured 2026-11-23: "
        "KolektorSDD tier-2 pixel-AP 0.064 -> 0.146, magnetic_tile 0.024 -> 0.061.",
        default=3, ge=0, le=16)
    position_min_frames: int = restart(
        "Tier 2: calibrate each grid cell against the same cell of the lot's other frames of the same "
        "geometry (height and width within 3 %), when at least this many frames share it: on a "
        "fixtured part a place that scores high on every frame (a hole, a bevel, a reflection) is "
        "normal there, and a defect is what rises above that level. Frames of mixed sizes are left "
        "alone (magnetic_tile). Tier 1 uses the last closed lot's. 0 = off. Measured 2026-12-01 "
        "(tier 2, shipped budget): KolektorSDD pixel-AUROC 0.952 -> 0.968, pixel-AP 0.146 -> 0.160; "
        "synthetic line pixel-AP 0.514 -> 0.645.", default=8, ge=0, le=4096)
    context_weight: float = restart(
        "Weight of the context level: the backbone's stride-32 stage, scored like the patches on its "
        "own coarse grid and added to each patch's score (0 = off, the stage is not run). It finds "
        "large defects whose every patch has some look-alike elsewhere (breaks, frays, stains) and "
        "blurs thin ones. Measured 2026-12-01 (tier 2, 32/1): 1.0 gives magnetic_tile pixel-AP "
        "0.062 -> 0.099 and image-AUROC 0.808 -> 0.812, KolektorSDD pixel-AUROC 0.967 -> 0.983 but "
        "pixel-AP 0.160 -> 0.118, the synthetic line pixel-AP 0.69 -> 0.47: a per-product choice, "
        "checked with `linewatch eval`.",
        default=0.0, ge=0, le=16)
    tier2_memory_frames: int = restart(
        "Tier 2: the last this-many frames of earlier lots (their tier-1 reference patches, a quarter "
        "of each grid; held in memory, empty again after a restart or an engine change) join every "
        "frame's references, while the number of nearest distances averaged "
        "stays the lot's (topk_fraction x the lot's references: 9 with 32). A look that recurs on a "
        "few frames of every lot (pen marks, grinding patterns) then counts as normal, and so does a "
        "defect that recurs on that many frames of the lot and the memory together (a systematic "
        "fault on 1 part in 18 at 128 frames, lots of 32, 32 references). Each memory frame costs a "
        "quarter of a full tier-2 reference (2 CPU cores, shipped budget: lot close 0.21 s -> 1.47 s "
        "at 128). 0 = off. Measured 2026-12-01 (tier 2, 32/1, context level 1.0): 128 gives "
        "magnetic_tile pixel-AP 0.099 -> 0.128, AUPRO 0.781 -> 0.794, image-AUROC 0.812 -> 0.832; "
        "KolektorSDD (lots of 8, one commutator each) loses (64: pixel-AP 0.160 -> 0.098): a "
        "per-product choice, checked with `linewatch eval`.", default=0, ge=0, le=4096)
    smooth_cells: float = restart(
        "Gaussian blur of the score maps, in grid cells (a cell is 8 px of the working geometry; "
        "sigma). The image score is the top 1 % of the blurred map, so the verdict, its regions and "
        "the map agree. Larger suits defects much larger than a cell (surface unevenness, frays): "
        "the hot cells they set off are patchy and the blur joins them, while an isolated hot cell "
        "on a good part fades. Smaller suits thin cracks. Measured 2026-12-01 (tier 2, 32/1, "
        "context level 1.0, memory 128): 2.0 gives magnetic_tile pixel-AP 0.128 -> 0.154 with "
        "AUPRO level (0.794 -> 0.793) but image-AUROC 0.832 -> 0.822; KolektorSDD loses (1.0: "
        "pixel-AP 0.160 -> 0.145): a per-product choice, checked with `linewatch eval`.",
        default=0.5, ge=0, le=8)
    engines_dir: Path = restart("Folder of exported ONNX models and TensorRT plans.", default=Path("engines"))


class PromptConfig(Strict):
    """IAP-AS prompts and region scoring (see linewatch.prompts). Under [engine.prompts] for the
    default, and [engine.recipes.<recipe>] to override any of these keys for lots of one recipe."""

    product: str = restart("Product name put in the prompts ({product}).", default="part")
    material: str = restart("Material put in the prompts ({material}); empty drops the word.",
                            default="")
    defects: list[str] = restart(
        "Defect phrases ({defect}); one sentence per template x phrase. 'any defect' is the "
        "universal prompt.", default=["any defect"], min_length=1)
    templates: list[str] = restart(
        "Sentence templates. Placeholders: {defect} {product} {material} and the image tags "
        "{brightness} {contrast} {texture} {orientation}, measured from each frame.",
        default=["{defect} on the {product}"], min_length=1)
    image_tags: bool = restart("Measure brightness / contrast / texture / orientation from each "
                               "frame and fill the tag placeholders (off: they drop out).",
                               default=True)
    min_region_fraction: float = restart(
        "Candidate regions smaller than this share of the image are dropped.", default=0.0005,
        ge=0, le=1)
    max_region_fraction: float = restart(
        "Candidate regions larger than this share of the image are not scored as defects (a mask "
        "that floods the frame is a misfire), but the frame is NG with an 'oversized' region, never "
        "OK (a covered lens or glare must not pass).", default=0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _templates_known(self) -> "PromptConfig":
        from .prompts import check_template

        for t in self.templates:
            check_template(t)
        if any(not d.strip() for d in self.defects):
            raise ValueError("defects: a defect phrase must not be blank")
        if self.min_region_fraction > self.max_region_fraction:
            raise ValueError("min_region_fraction must not exceed max_region_fraction")
        return self


class RecipePrompts(Strict):
    """Per-recipe override of [engine.prompts]: only the keys given here change."""

    product: str | None = restart("Product name for this recipe.", default=None)
    material: str | None = restart("Material for this recipe.", default=None)
    defects: list[str] | None = restart("Defect phrases for this recipe.", default=None, min_length=1)
    templates: list[str] | None = restart("Templates for this recipe.", default=None, min_length=1)
    image_tags: bool | None = restart("Measure image tags for this recipe.", default=None)
    min_region_fraction: float | None = restart("Minimum region share for this recipe.",
                                                default=None, ge=0, le=1)
    max_region_fraction: float | None = restart("Maximum region share for this recipe.",
                                                default=None, gt=0, le=1)

    def apply(self, base: PromptConfig) -> PromptConfig:
        """``base`` with this recipe's keys replaced (validated again)."""
        update = {k: v for k, v in self.model_dump().items() if v is not None}
        return PromptConfig.model_validate({**base.model_dump(), **update})


def check_recipes(prompts: PromptConfig, recipes: dict[str, RecipePrompts]) -> None:
    """Each recipe's overrides applied to ``prompts`` must make a valid PromptConfig: checked with
    the config, not on the recipe's first frame (where it would fault every batch)."""
    for name, override in recipes.items():
        try:
            override.apply(prompts)
        except ValidationError as exc:
            why = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'prompts'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"recipes.{name}: {why}") from None


class DQFormerEngine(Strict):
    """DQFormer referring segmenter: outputs a mask directly (no threshold), prompts by IAP-AS."""

    kind: Literal["dqformer"] = "dqformer"
    checkpoint: Path = restart("DQFormer checkpoint written by `linewatch train dqformer` (last.pt). "
                               "A missing file stops the daemon at startup.",
                               default=Path("engines/dqformer.pt"))
    backend: Literal["torch", "onnxruntime", "tensorrt"] = restart(
        "Where the segmenter runs: torch (the checkpoint as is), onnxruntime or tensorrt (the "
        "checkpoint is exported to engines_dir on first start, and for tensorrt an FP16 plan is "
        "built for this GPU; both are redone when the checkpoint changes). The sentence encoder "
        "stays on torch, each sentence encoded once.", default="torch")
    device: str = restart("torch device (cpu, cuda, cuda:0); for onnxruntime, cuda asks for its CUDA "
                          "provider; for tensorrt, the GPU index.", default="cpu", pattern=DEVICE_PATTERN)
    threads: int = restart("CPU threads for the engine (0 = all cores).", default=0, ge=0)
    engines_dir: Path = restart("Folder of exported ONNX models and TensorRT plans.", default=Path("engines"))
    prompts: PromptConfig = restart("Prompt composition and region scoring.",
                                    default_factory=PromptConfig)
    recipes: dict[str, RecipePrompts] = restart(
        "Per-recipe prompt overrides, keyed by recipe name, e.g. "
        "recipes.tile_a = { product = \"magnetic tile\", material = \"ferrite\" }.",
        default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "DQFormerEngine":
        check_recipes(self.prompts, self.recipes)
        if self.backend == "tensorrt" and not self.device.startswith("cuda"):
            raise ValueError(f"backend tensorrt runs on a GPU: set device = \"cuda\" or \"cuda:<index>\" "
                             f"(not {self.device!r})")
        return self


class ClipEngine(Strict):
    """CLIP-style zero-shot: similarity of patch embeddings to normal vs anomalous prompts."""

    kind: Literal["clip"] = "clip"
    weights: Path = restart("Folder of a CLIP model in Hugging Face layout (config.json, "
                            "model.safetensors, tokenizer files). Nothing is downloaded; a "
                            "missing folder stops the daemon at startup.",
                            default=Path("engines/clip"))
    device: str = restart("torch device (cpu, cuda, cuda:0).", default="cpu", pattern=DEVICE_PATTERN)
    threads: int = restart("CPU threads for the engine (0 = all cores).", default=0, ge=0)
    normal_templates: list[str] = restart(
        "Templates of the 'normal' prompts (placeholders as in prompts.templates, no {defect}).",
        default=["a photo of a flawless {product}", "a photo of a {texture} {product} without defects"],
        min_length=1)
    temperature: float = restart("Softmax temperature on cosine similarities (CLIP uses 0.01).",
                                 default=0.01, gt=0)
    prompts: PromptConfig = restart("Anomalous prompts. The region keys are not used here: the image "
                                    "score is the map's peak and regions come from the threshold.",
                                    default_factory=lambda: PromptConfig(
                                        defects=["a defect", "a crack", "a scratch", "damage"],
                                        templates=["a photo of a {product} with {defect}"]))
    recipes: dict[str, RecipePrompts] = restart("Per-recipe prompt overrides (as for dqformer).",
                                                default_factory=dict)

    @model_validator(mode="after")
    def _normal_templates_known(self) -> "ClipEngine":
        from .prompts import check_template

        for t in self.normal_templates:
            check_template(t, defect=False)
        check_recipes(self.prompts, self.recipes)
        return self


EngineConfig = Annotated[Union[ZeroShotEngine, DQFormerEngine, ClipEngine], Field(discriminator="kind")]


class RefineConfig(Strict):
    """AnoRefiner (tier 2): refine each closed lot's zero-shot maps with the ARD trained on an
    earlier lot, then train the next ARD on this lot (PGT) in a background thread."""

    enabled: bool = restart("Refine tier-2 lot results with the ARD and train it on each lot (PGT). "
                            "Off: tier 2 publishes the coarse whole-lot maps. Off by default: it "
                            "sharpens thin defects on smooth surfaces (KolektorSDD pixel-AP 0.160 -> "
                            "0.19-0.21, pixel-AUROC level with coarse) but gains nothing on textured "
                            "magnetic_tile (0.099 -> 0.100-0.105); check a product with "
                            "`linewatch eval --methods coarse,refined` before enabling it.",
                            default=False)
    steps: int = restart("Training steps per lot, at most.", default=20, ge=1, le=100000)
    time_budget_s: float = restart("Wall-clock budget per lot for building samples (at most half "
                                   "of it; fewer samples when they take longer) and training; a "
                                   "round stops at whichever of steps / budget ends first.",
                                   default=30.0, gt=0)
    cpu_share: float = restart("Share of the time the training may run (it pauses between steps so "
                               "tier 1 keeps the rest; each step uses as many threads as the "
                               "engine, `[engine] threads`); 1 = no pause.", default=0.5, gt=0, le=1)
    pseudo_normal_fraction: float = restart(
        "Share of each lot, lowest zero-shot image scores first, used as normal frames for PGT.",
        default=0.6, gt=0, le=1)
    min_pseudo_normals: int = restart("A lot with fewer pseudo-normal frames is not trained on.",
                                      default=2, ge=1)
    samples_per_lot: int = restart("Synthetic-anomaly training samples built per lot.", default=8,
                                   ge=1, le=4096)
    references: int = restart("Frames each training sample is mutually scored against.", default=6,
                              ge=1, le=256)
    drawn_share: float = restart("Share of the synthetic anomalies drawn with the line simulator's "
                                 "defect shapes (scratch, crack, spot, missing chunk); the rest are "
                                 "Perlin-shaped pastes of foreign texture.", default=0.5, ge=0, le=1)
    batch_size: int = restart("Crops per training step.", default=4, ge=1, le=256)
    crop_px: int = restart("Side of the square training crops, in working-geometry pixels.",
                           default=96, ge=32, le=2048)
    lr: float = restart("Adam learning rate.", default=1e-3, gt=0)
    loss: Literal["rank", "focal_dice"] = restart(
        "PGT training loss: rank = anomaly pixels against the hardest normal pixels (pixel-AP is a "
        "ranking); focal_dice = per-pixel focal + dice.", default="rank")
    width: int = restart("Channels of the decoder at the patch scale.", default=24, ge=4, le=256)
    delta_max: float = restart("Largest change the decoder may make to a coarse score, in lot score "
                               "units (it reshapes the coarse map within +- this bound). Keep it at "
                               "most gate_units. Measured on Kolektor and magnetic_tile "
                               "(bench/refine_replay.py): 1.0 sharpens cracks best; textured "
                               "surfaces lose less with 0.5.", default=1.0, gt=0, le=10)
    gate_units: float = restart("Coarse score (lot units) from which the decoder's correction applies "
                                "in full; below it the correction fades linearly to nothing at 0, so "
                                "cold pixels keep their coarse score (and warm ones most of theirs: with "
                                "2.0 instead of 1.0, Kolektor pixel-AUROC stays level with coarse). "
                                "0 = no gate.", default=2.0, ge=0, le=10)
    raise_max: float = restart("Largest increase the decoder may make to a coarse score (lot units; "
                               "at most delta_max takes effect). With a peak window a pixel also never "
                               "rises above the highest coarse score around it, so the decoder can lift "
                               "the outskirts of a hot region towards its peak but cannot raise normal "
                               "texture out of a cold neighbourhood. 0 = it only lowers scores. Measured "
                               "2026-12-01 (KolektorSDD replays): 1.0 gave pixel-AP 0.209-0.225 on 1 "
                               "training thread against 0.192-0.197 with 0, but 0.199-0.200 on 2 threads "
                               "against 0.203-0.206: within the spread of the training path, so 0 stays.",
                               default=0.0, ge=0, le=10)
    peak_window_px: int = restart("A pixel is lowered at most by how far its coarse score lies below "
                                  "the highest one within this window (working-geometry pixels), so the "
                                  "inside of a large defect, as hot as its own peak, is never hollowed "
                                  "out (magnetic_tile's frays and breaks). 0 = no such bound; odd.",
                                  default=25, ge=0, le=255)
    sample_memory: bool = restart("Score the PGT samples against the tier-2 memory too (earlier lots' "
                                  "frames, [engine] tier2_memory_frames), as the lot's own maps are. "
                                  "Measured 2026-12-01 on magnetic_tile: no gain, at twice the PGT "
                                  "time.", default=False)
    seed: int = restart("Random seed of the synthesis and training.", default=0)

    @model_validator(mode="after")
    def _odd_peak_window(self) -> "RefineConfig":
        if self.peak_window_px and self.peak_window_px % 2 == 0:
            raise ValueError(f"peak_window_px must be 0 or odd, got {self.peak_window_px}")
        return self

    @model_validator(mode="after")
    def _gate_keeps_the_ranking(self) -> "RefineConfig":
        if self.gate_units > 0 and self.delta_max > self.gate_units:
            raise ValueError(f"delta_max ({self.delta_max:g}) must not exceed gate_units "
                             f"({self.gate_units:g}): a larger correction under the gate could invert "
                             "the coarse ranking")
        return self


class InspectConfig(Strict):
    batch_size: int = live("Frames per engine call, at most. A reload applies it to the inspector at "
                           "once; an engine built for a batch size (a TensorRT plan's profile) keeps "
                           "its own until the engine restarts, and splits larger batches.",
                           default=4, ge=1, le=256)
    batch_wait_ms: float = live("Wait at most this long for a batch to fill.", default=5.0, ge=0)
    deadline_ms: float = live("A frame not inspected this long after capture is published FAULT "
                              "(deadline overrun); 0 disables.", default=1000.0, ge=0)


class ThresholdConfig(Strict):
    mode: Literal["fixed", "calibrated"] = live(
        "fixed = use `value`; calibrated = median + k * MAD of recent image scores.", default="calibrated")
    value: float = live("Image-score threshold for mode=fixed (also the pixel threshold).", default=1.0)
    k_mad: float = live("Robust z for mode=calibrated.", default=4.0, gt=0)
    window: int = live("How many recent image scores calibrate the threshold.", default=128, ge=8)
    min_scores: int = live("Until this many scores are in the window, the last calibrated threshold "
                           "is used; before the first calibration frames go out NOT_INSPECTED "
                           "('threshold calibrating', with their score).", default=8, ge=1)
    min_region_px: int = live("Regions smaller than this many pixels are ignored.", default=16, ge=0)

    @model_validator(mode="after")
    def _window_holds_min_scores(self) -> "ThresholdConfig":
        if self.min_scores > self.window:
            raise ValueError(f"min_scores ({self.min_scores}) must not exceed window ({self.window}): the "
                             "window never holds that many scores, so the threshold would never calibrate")
        return self


# -------------------------------------------------------------------------------------- publish
class PublishConfig(Strict):
    endpoint: str = restart("ZeroMQ PUB endpoint to bind (tcp://host:port, ipc://path). A reload "
                            "moves the publisher there between two messages (seq numbering goes on; "
                            "subscribers connect to the new address).",
                            default="tcp://127.0.0.1:5556", pattern=ENDPOINT_PATTERN)
    control_endpoint: str = restart("ZeroMQ REP endpoint for control commands (a reload keeps the "
                                    "old one: restart the daemon).",
                                    default="tcp://127.0.0.1:5557", pattern=ENDPOINT_PATTERN)
    sndhwm: int = restart("PUB send high-water mark (messages); beyond it a slow subscriber loses "
                          "messages, which it sees as seq gaps. A reload applies a new value to "
                          "subscribers that connect after it.", default=10000, ge=1, le=2**31 - 1)
    heartbeat_s: float = live("Heartbeat period.", default=1.0, gt=0)
    payload: Literal["none", "mask", "score_map"] = live("PNG payload attached to frame results: mask = "
                                                         "the defect mask of NG frames; score_map = the "
                                                         "score map of OK and NG frames.",
                                                         default="mask")


# ---------------------------------------------------------------------------------------- store
class StoreConfig(Strict):
    url: str = restart("SQLAlchemy URL: sqlite:///path.db (WAL) or postgresql+psycopg://host/db.",
                       default="sqlite:///var/linewatch.db")
    batch_size: int = restart("Rows per insert batch, at most.", default=256, ge=1)
    flush_interval_s: float = restart("Write a partial batch after this long.", default=0.5, gt=0)
    spool_dir: Path = restart("When the database is down, results wait here on disk.",
                              default=Path("var/spool"))
    spool_max_mb: float = restart("Cap of the on-disk spool; beyond it the oldest spool file is "
                                  "dropped and counted.", default=512.0, gt=0)
    spool_sync_s: float = restart("Spooled rows are synced to disk this long after they were written "
                                  "(checked every flush_interval_s), so a power loss takes at most "
                                  "about this much; 0 = before the write returns (an fsync per batch, "
                                  "and per row spooled from a full queue).", default=1.0, ge=0, le=60)
    retry_s: float = restart("How often to retry a database that is down.", default=2.0, gt=0)
    retention_days: float = live("Results (with their regions) captured, and lots closed, longer ago "
                                 "than this are deleted, checked every 10 minutes; model versions are "
                                 "kept. 0 = keep everything: at 25 frames/s a SQLite file grows by "
                                 "about 1.1 GB a day (a tier-1 and a tier-2 row per frame; measured, "
                                 "README).", default=0.0, ge=0)


class MetricsConfig(Strict):
    port: int = restart("Prometheus metrics port; 0 disables.", default=9108, ge=0, le=65535)
    host: str = restart("Address the metrics server binds.", default="127.0.0.1")


class Config(Strict):
    """The whole of config.toml."""

    daemon: DaemonConfig = Field(default_factory=DaemonConfig, description="Daemon-wide settings.")
    source: SourceConfig = Field(default_factory=SyntheticSource, description="Where frames come from.")
    ring: RingConfig = Field(default_factory=RingConfig, description="The frame ring.")
    lots: LotsConfig = Field(default_factory=LotsConfig, description="Lot grouping.")
    engine: EngineConfig = Field(default_factory=ZeroShotEngine, description="Inspection engine.")
    refine: RefineConfig = Field(default_factory=RefineConfig,
                                 description="AnoRefiner: tier-2 refinement and test-time training.")
    inspect: InspectConfig = Field(default_factory=InspectConfig, description="Batching and deadline.")
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig, description="OK/NG decision.")
    publish: PublishConfig = Field(default_factory=PublishConfig, description="ZeroMQ sockets.")
    store: StoreConfig = Field(default_factory=StoreConfig, description="SQL history.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus metrics.")

    @model_validator(mode="after")
    def _distinct_endpoints(self) -> "Config":
        if self.publish.endpoint == self.publish.control_endpoint:
            raise ValueError("publish.endpoint and publish.control_endpoint must differ")
        return self

    @model_validator(mode="after")
    def _waits_below_stale(self) -> "Config":
        # acquisition waiting this long on purpose must not look hung to the watchdog
        stale = self.daemon.stage_stale_s
        waits = [("ring.block_timeout_s", self.ring.block_timeout_s)]
        if getattr(self.source, "fetch_timeout_s", None) is not None:
            waits.append(("source.fetch_timeout_s", self.source.fetch_timeout_s))
        for key, value in waits:
            if value >= stale:
                raise ValueError(f"{key} ({value:g} s) must be below daemon.stage_stale_s ({stale:g} s): "
                                 f"acquisition waiting that long would look hung, and systemd would restart "
                                 f"a healthy daemon")
        return self

    @model_validator(mode="after")
    def _lots_can_close(self) -> "Config":
        # a lot that never closes never gets tier 2, and its frames are kept without bound
        if self.lots.policy == "idle" and self.lots.idle_gap_s <= 0:
            raise ValueError("lots.policy = \"idle\" needs lots.idle_gap_s > 0 (the gap that closes a lot)")
        if self.lots.policy == "line" and getattr(self.source, "line_value_node", None) is None:
            raise ValueError("lots.policy = \"line\" needs a genicam source with source.line_value_node "
                             "(the node whose changes close a lot)")
        return self


# ---------------------------------------------------------------------------------------- loader
class ConfigError(Exception):
    """A config that cannot be used. ``lines`` holds one human-readable line per problem."""

    def __init__(self, path: Path | str, lines: list[str]):
        self.path = str(path)
        self.lines = lines
        super().__init__("\n".join(lines))


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """Best-effort line number of a key path in TOML text (section header, then key)."""
    keys = [str(k) for k in loc if not isinstance(k, int)]
    if not keys:
        return None
    lines = text.splitlines()
    start = 0
    if len(keys) > 1:
        header = re.compile(r"^\s*\[\s*" + re.escape(".".join(keys[:-1])) + r"\s*\]")
        for i, ln in enumerate(lines):
            if header.match(ln):
                start = i
                break
        else:
            return _section_line(lines, keys[0])  # the section itself may be the problem
    key = re.compile(r"^\s*" + re.escape(keys[-1]) + r"\s*=")
    for i in range(start, len(lines)):
        if key.match(lines[i]):
            return i + 1
    if len(keys) == 1:  # a whole section: its [header] (a misspelled one, a cross-field check)
        return _section_line(lines, keys[0])
    return start + 1


def _section_line(lines: list[str], name: str) -> int | None:
    """Line number of the first ``[name]`` or ``[name.sub]`` table header, None without one."""
    header = re.compile(r"^\s*\[\s*" + re.escape(name) + r"\s*[\].]")
    return next((i + 1 for i, ln in enumerate(lines) if header.match(ln)), None)


def _kinds(loc: tuple[Any, ...]) -> str:
    """The ``kind`` values a discriminated section (``source``, ``engine``) accepts."""
    field = Config.model_fields.get(str(loc[0])) if len(loc) == 1 else None
    members = typing.get_args(field.annotation) if field is not None else ()
    return ", ".join(repr(m.model_fields["kind"].default) for m in members if hasattr(m, "model_fields"))


def _format_errors(path: Path | str, text: str, exc: ValidationError, raw: dict[str, Any]) -> list[str]:
    out = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        # drop pydantic's discriminator tags ('synthetic', 'zeroshot') from the path
        clean = tuple(k for k in loc if k not in ("synthetic", "replay", "genicam", "zeroshot",
                                                  "dqformer", "clip"))
        keypath = ".".join(str(k) for k in clean) or "(top level)"
        line = _line_of(text, clean)
        where = f"{path}:{line}" if line else f"{path}"
        value = err.get("input")
        if err["type"] == "missing":
            out.append(f"{where}: {keypath}: required key is missing")
            continue
        if err["type"] in ("union_tag_not_found", "union_tag_invalid"):
            tags = (err.get("ctx") or {}).get("expected_tags") or _kinds(clean)
            ln = _line_of(text, (*clean, "kind")) or line
            where = f"{path}:{ln}" if ln else f"{path}"
            got = value.get("kind") if isinstance(value, dict) else None
            what = f"= {got!r}: unknown kind" if got is not None else "is missing"
            out.append(f"{where}: {keypath}.kind {what}; expected one of {tags}")
            continue
        if err["type"] == "extra_forbidden":
            out.append(f"{where}: {keypath} = {value!r}: unknown key (not part of linewatch's config)")
            continue
        shown = value if not isinstance(value, dict) else "{...}"
        msg = str(err["msg"]).removeprefix("Value error, ")  # a check of ours says it all itself
        if err["type"] == "string_pattern_mismatch":  # say what is expected, not the regex
            msg = PATTERN_MEANING.get((err.get("ctx") or {}).get("pattern"), msg)
        out.append(f"{where}: {keypath} = {shown!r}: {msg}")
    return out


def parse(text: str, path: Path | str = "<string>") -> Config:
    """Validate TOML text; raises ConfigError listing every problem, one per line."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"{path}: not valid TOML: {exc}"]) from None
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(path, _format_errors(path, text, exc, raw)) from None
    problems = check_paths(cfg, path, text)
    if problems:
        raise ConfigError(path, problems)
    return cfg


def load(path: Path | str) -> Config:
    """Read and validate a config file; raises ConfigError (never a traceback for bad input)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(p, [f"{p}: config file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(p, [f"{p}: cannot read config: {exc}"]) from None
    return parse(text, p)


def load_or_report(path: Path | str) -> Config | None:
    """``load`` for a command: on a bad config, print its lines to stderr and return None."""
    try:
        return load(path)
    except ConfigError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return None


def check_paths(cfg: Config, path: Path | str, text: str) -> list[str]:
    """Checks that need the machine: the cti file exists, the replay folder exists, the engine
    backend's packages are installed."""
    problems = []
    src = cfg.source
    if isinstance(src, GenicamSource) and not src.cti.is_file():
        ln = _line_of(text, ("source", "cti"))
        problems.append(f"{path}:{ln or '?'}: source.cti = '{src.cti}': GenTL producer file not found")
    if isinstance(src, ReplaySource) and not src.path.is_dir():
        ln = _line_of(text, ("source", "path"))
        problems.append(f"{path}:{ln or '?'}: source.path = '{src.path}': replay folder not found")
    eng = cfg.engine
    if isinstance(eng, DQFormerEngine) and not eng.checkpoint.is_file():
        ln = _line_of(text, ("engine", "checkpoint"))
        problems.append(f"{path}:{ln or '?'}: engine.checkpoint = '{eng.checkpoint}': DQFormer "
                        f"checkpoint not found (train one with `linewatch train dqformer`)")
    if isinstance(eng, ClipEngine) and not (eng.weights / "config.json").is_file():
        ln = _line_of(text, ("engine", "weights"))
        problems.append(f"{path}:{ln or '?'}: engine.weights = '{eng.weights}': no CLIP model "
                        f"(config.json) in that folder")
    if str(getattr(eng, "device", "cpu")).startswith("cuda") and getattr(eng, "backend", "torch") == "torch":
        import torch

        if not torch.cuda.is_available():
            ln = _line_of(text, ("engine", "device"))
            problems.append(f"{path}:{ln or '?'}: engine.device = '{eng.device}': no CUDA device here "
                            f"(torch {torch.__version__})")
    from .store.db import StoreError, parse_url

    try:
        parse_url(cfg.store.url)
    except StoreError as exc:
        ln = _line_of(text, ("store", "url"))
        problems.append(f"{path}:{ln or '?'}: {exc}")
    backend = getattr(eng, "backend", "torch")
    if backend != "torch":  # optional packages (tensorrt, pycuda) are looked up, never imported here
        from .runtime import backend_problem

        problem = backend_problem(backend)
        if problem:
            ln = _line_of(text, ("engine", "backend"))
            problems.append(f"{path}:{ln or '?'}: engine.backend = '{backend}': {problem}")
    return problems


def live_fields(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, bool]:
    """Map of dotted key path -> live flag for every leaf field (used by reload and the docs)."""
    out: dict[str, bool] = {}
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = f.annotation
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if sub is not None:
            out.update(live_fields(sub, key + "."))
        else:
            extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
            out[key] = bool(extra.get("live", False))
    return out


def diff(old: Config, new: Config) -> dict[str, list[str]]:
    """Which top-level sections changed and which dotted keys in each."""
    changed: dict[str, list[str]] = {}
    a, b = old.model_dump(), new.model_dump()
    for section in a:
        if a[section] != b[section]:
            keys = sorted(k for k in set(a[section]) | set(b[section])
                          if a[section].get(k) != b[section].get(k))
            changed[section] = keys
    return changed


def to_toml(cfg: Config) -> str:
    """The effective config (defaults filled in) as TOML, for `check-config --print`."""
    lines: list[str] = []
    data = cfg.model_dump(mode="json")
    for section, values in data.items():
        lines.append(f"[{section}]")
        tables = []
        for k, v in values.items():
            if isinstance(v, dict):
                tables.append((k, v))
            elif v is None:
                lines.append(f"# {k} is not set")
            else:
                lines.append(f"{k} = {_toml_value(v)}")
        for k, v in tables:
            lines.append(f"[{section}.{k}]")
            for kk, vv in v.items():
                lines.append(f"{kk} = {_toml_value(vv)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # nested tables (engine.recipes.<name>) as TOML inline tables
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")
