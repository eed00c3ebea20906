"""GenICam / GenTL camera source (harvesters), with reopen on loss and pixel-format conversion.

What the simulated producer in the ``genicam`` 1.6.0 wheel (``genicam/viky.cti``, "Machine
Vision Games Ltd. Viky") offers, as explored with harvesters 1.4.3:

- three devices, ``VikyTL_DEV_red`` / ``_green`` / ``_blue``, serials ``"0"``, ``"1"``, ``"2"``;
  ``DeviceModelName`` is not in the remote node map (the device info says model ``Viky``).
- ``Width`` / ``Height``: IInteger RW, 100..800, inc 1, default 400 x 400.
- ``PixelFormat``: IEnumeration RW, ``RGBa8`` (default, 4 bytes per pixel, alpha dropped here)
  or ``Mono8``. No Bayer or 10/12/16-bit formats.
- ``AcquisitionFrameRate``: IFloat RW, 1.0..200.0, default 20; frames arrive at that rate
  (measured through this source: 19.9 fps at 20, 97 at 100, 188 at 200 for 320x240 Mono8; at
  800x600 RGBa8 / 200 the conversion keeps up with ~78 fps and frame-id gaps show the loss).
  ``AcquisitionMode`` is RO ``Continuous``.
- No ``TriggerMode`` / ``TriggerSoftware``, no ``ExposureTime``, no ``Gain``: the camera is
  free running, so ``software_trigger_fps`` must stay 0 with it.
- ``BouncingBallSize`` IInteger RW 1..40 (the picture is a ball on white), ``AspectRatio`` RO,
  ``ComponentEnable`` RO.
- Chunks: ``ChunkModeActive`` RW (on), ``ChunkSelector`` ``NrBounces``/``Scan3dData``,
  ``ChunkNrBounces`` (IInteger, readable only while a buffer is attached; stays 0 in short runs):
  usable as ``line_value_node``.
- Buffers: frame ids start at 1 at every acquisition start (so they restart after a reopen);
  block id and buffer timestamps are not available. Stream node map has
  ``StreamBufferHandlingMode`` (``OldestFirst``, ``OldestFirstOverwrite``, ``NewestOnly``),
  ``StreamAnnounceBufferMinimum`` = 1.
- GenApi errors: out of range -> ``OutOfRangeException``, read-only -> ``AccessException``,
  bad enum entry or unparsable text -> ``InvalidArgumentException``; a missing node raises
  ``LogicalErrorException`` ("Node not existing") from ``NodeMap.get_node``.
- ``Harvester.add_file`` accepts a path that does not exist without complaint, so the path is
  checked here. Creating an ``ImageAcquirer`` on the main thread replaces the SIGINT handler;
  it is restored here.

Older ``genicam`` wheels (1.3-1.5) ship ``TLSimu.cti`` instead, with a software trigger.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from genicam.genapi import GenericException as GenApiError
from genicam.genapi import EAccessMode, LogicalErrorException, OutOfRangeException
from genicam.genapi import AccessException, InvalidArgumentException
from genicam.gentl import GenericException as GenTLError
from genicam.gentl import TimeoutException
from harvesters.core import Harvester, ImageAcquirer

from ..config import GenicamSource
from ..frames import FrameMeta
from .base import SourceError, SourceFrame, SourceStatus

logger = logging.getLogger(__name__)

# What a vanished camera raises out of harvesters: GenTL/GenApi errors, and plain Python errors
# from an acquirer whose internals were torn down (empty stream list, node map set to None).
_LOSS_ERRORS = (GenTLError, GenApiError, IndexError, AttributeError, ValueError, RuntimeError)
# GenTL producers loaded by a Harvester in this process: a second Harvester on the same .cti
# sees no devices (the producer's system module is per process), so it is refused clearly.
_producers_in_use: set[str] = set()
_producers_lock = threading.Lock()
# A free-running camera silent for this many fetch timeouts (and at least this many frame
# periods) is treated as lost; a triggered camera may be silent as long as the line stops.
STALL_TIMEOUTS = 10
STALL_FRAME_PERIODS = 3


def find_simulated_cti() -> Path | None:
    """The simulated GenTL producer shipped in the installed ``genicam`` wheel, or None."""
    spec = importlib.util.find_spec("genicam")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        root = Path(folder)
        for name in ("viky.cti", "TLSimu.cti"):
            if (root / name).is_file():
                return root / name
        found = sorted(root.rglob("*.cti"))
        if found:
            return found[0]
    return None


# ------------------------------------------------------------------------- pixels and frame ids
_FORMAT = re.compile(r"^(Mono|Bayer(?:RG|GB|GR|BG)|RGBa|BGRa|RGB|BGR)(8|10|12|14|16)(p|Packed)?$")


def is_supported(pixel_format: str) -> bool:
    """Whether :func:`convert_pixels` handles this PFNC pixel format name."""
    return _FORMAT.match(pixel_format) is not None


def convert_pixels(data: np.ndarray, pixel_format: str, height: int, width: int) -> np.ndarray:
    """Flat pixel data (as harvesters unpacks it) -> HxW (mono) or HxWx3 (RGB) uint8.

    More than 8 bits are scaled down by shifting; Bayer mosaics are demosaiced crudely (one RGB
    value per 2x2 cell, repeated), which is enough to inspect a surface, not to grade colour.
    """
    m = _FORMAT.match(pixel_format)
    if m is None:
        raise ValueError(f"unsupported pixel format {pixel_format}")
    family, bits = m.group(1), int(m.group(2))
    n_comp = {"Mono": 1, "RGB": 3, "BGR": 3, "RGBa": 4, "BGRa": 4}.get(family, 1)
    need = height * width * n_comp
    if data.size < need:
        raise ValueError(f"{pixel_format} {width}x{height} needs {need} values, got {data.size}")
    arr = np.asarray(data[:need])
    if bits > 8:
        arr = (arr.astype(np.uint16) >> (bits - 8)).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = arr.astype(np.uint8)
    if n_comp == 1:
        img = arr.reshape(height, width)
        return bayer_to_rgb(img, family[5:]) if family.startswith("Bayer") else img
    img = arr.reshape(height, width, n_comp)[:, :, :3]
    return img[:, :, ::-1] if family.startswith("BGR") else img


def bayer_to_rgb(mosaic: np.ndarray, pattern: str) -> np.ndarray:
    """Crude demosaic of an HxW Bayer mosaic whose top-left 2x2 cell is ``pattern`` (e.g. RG)."""
    h, w = mosaic.shape
    padded = np.pad(mosaic, ((0, h % 2), (0, w % 2)), mode="reflect")  # keeps the pattern
    cells = {"RG": "RGGB", "GB": "GBRG", "GR": "GRBG", "BG": "BGGR"}[pattern]
    quad = [padded[0::2, 0::2], padded[0::2, 1::2], padded[1::2, 0::2], padded[1::2, 1::2]]
    red = quad[cells.index("R")]
    blue = quad[cells.index("B")]
    g1, g2 = (quad[i] for i, c in enumerate(cells) if c == "G")
    green = ((g1.astype(np.uint16) + g2) // 2).astype(np.uint8)
    small = np.stack([red, green, blue], axis=-1)
    return np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)[:h, :w]


def fit_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """HxW or HxWx3 uint8 -> HxWx``channels``: mono is replicated, RGB is turned to luma."""
    if img.ndim == 2:
        return np.repeat(img[:, :, None], channels, axis=2)
    if channels == 3:
        return img
    luma = img[..., 0] * 0.299 + img[..., 1] * 0.587 + img[..., 2] * 0.114
    return np.clip(luma + 0.5, 0, 255).astype(np.uint8)[:, :, None]


class Resizer:
    """Nearest-neighbour resize from ``src_shape`` (H, W) to ``dst_shape``, indices precomputed."""

    def __init__(self, src_shape: tuple[int, int], dst_shape: tuple[int, int]):
        self.src_shape = tuple(src_shape)
        self.dst_shape = tuple(dst_shape)
        (sh, sw), (dh, dw) = self.src_shape, self.dst_shape
        self._rows = ((np.arange(dh) + 0.5) * sh / dh).astype(np.intp)
        self._cols = ((np.arange(dw) + 0.5) * sw / dw).astype(np.intp)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        return img[self._rows[:, None], self._cols[None, :]]


class FrameIdSequencer:
    """Turns the device's frame ids into ids that only increase across restarts and reopens.

    The device counter is kept while it increases (its gaps are camera-side loss). When a 16-bit
    block id wraps (GigE Vision 1.x: ... 65535, 1, 2 ...; 0 is not a block id; a device that has
    sent id 0 counts from 0 and wraps to 0) the ids go on as if it had not, so frames lost across
    the wrap still show as a gap. Any other step back (a
    device restarted after a reopen starts again at 1) shifts the ids to continue after the last
    one given out, with no gap: frames lost while the camera was away are counted as the reopen,
    not as frames. A device without frame ids gets a local counter.
    """

    WRAP = 0xFFFF  # the last 16-bit block id
    WRAP_WINDOW = 4096  # a step back from within this of WRAP to within this of 1 is a wrap

    def __init__(self) -> None:
        self.last: int | None = None
        self._last_raw: int | None = None
        self._offset = 0
        self.wraps = 0
        self._zero_based = False  # the device has sent id 0: its counter wraps to 0, not to 1

    def reopened(self) -> None:
        """The device was reopened: its next id starts a new count, whatever it is."""
        self._last_raw = None

    def next(self, raw: int | None) -> int:
        if raw is None:
            self.last = 0 if self.last is None else self.last + 1
            return self.last
        prev_raw, self._last_raw = self._last_raw, raw
        if raw == 0:
            self._zero_based = True
        out = raw + self._offset
        if self.last is None or out > self.last:
            self.last = out
            return out
        if (prev_raw is not None and self.WRAP - self.WRAP_WINDOW <= prev_raw <= self.WRAP
                and 0 <= raw <= self.WRAP_WINDOW):
            lost = (self.WRAP - prev_raw) + (raw if self._zero_based else max(0, raw - 1))
            out = self.last + 1 + lost
            self.wraps += 1
            logger.info("device block id wrapped (%d -> %d): ids continue at %d, %d frames lost "
                        "across the wrap", prev_raw, raw, out, lost)
        else:
            out = self.last + 1
            logger.info("device frame id went back to %d; ids continue at %d", raw, out)
        self._offset = out - raw
        self.last = out
        return out


@contextlib.contextmanager
def _sigint_preserved() -> Iterator[None]:
    """Put back the process's SIGINT handler that harvesters replaces on the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if before is not None and signal.getsignal(signal.SIGINT) is not before:
            signal.signal(signal.SIGINT, before)


def _node(node_map: Any, name: str) -> Any | None:
    """The typed node called ``name``, or None when the node map has no such node."""
    try:
        return getattr(node_map, name)
    except (AttributeError, LogicalErrorException):
        return None


def _why_refused(node: Any, value: object, exc: GenApiError) -> str:
    """A short reason a node refused a value, for the line engineer."""
    if isinstance(exc, OutOfRangeException):
        try:
            return f"out of range ({node.min} .. {node.max})"
        except GenApiError:
            return "out of range"
    if isinstance(exc, AccessException):
        return "not writable"
    if isinstance(exc, InvalidArgumentException):
        entries = getattr(node, "symbolics", None)
        if entries:
            return f"not one of {list(entries)}"
        return f"cannot convert {value!r} to the node's type"
    return str(exc).split(" : ")[0]


def apply_nodes(node_map: Any, nodes: dict[str, Any], model: str) -> None:
    """Set feature nodes in order; SourceError names the node, the value and why it failed.

    Strings go through GenApi's ``FromString`` (so "Mono8", "On", "400" all work); a command
    node given ``true`` is executed, ``false`` skips it.
    """
    for name, value in nodes.items():
        node = _node(node_map, name)
        if node is None:
            raise SourceError(f"camera node '{name}' does not exist on {model}")
        mode = node.node.get_access_mode()
        if mode not in (EAccessMode.RW, EAccessMode.WO):
            state = {EAccessMode.RO: "read-only", EAccessMode.NA: "not available now",
                     EAccessMode.NI: "not implemented"}.get(mode, f"access mode {mode}")
            raise SourceError(f"camera node '{name}' = {value!r} refused by {model}: {state}")
        try:
            if type(node).__name__ == "ICommand":
                if value:
                    node.execute()
            elif isinstance(value, str):
                node.from_string(value)
            elif isinstance(value, float) and type(node).__name__ == "IInteger":
                if not value.is_integer():
                    raise SourceError(f"camera node '{name}' = {value!r} refused by {model}: "
                                      "an integer node needs a whole number")
                node.value = int(value)
            else:
                node.value = value
        except GenApiError as exc:
            raise SourceError(f"camera node '{name}' = {value!r} refused by {model}: "
                              f"{_why_refused(node, value, exc)}") from None
        except TypeError:
            raise SourceError(f"camera node '{name}' = {value!r} refused by {model}: "
                              f"wrong type for a {type(node).__name__} node") from None
        logger.debug("set %s = %r on %s", name, value, model)


def _read_int(node: Any) -> int | None:
    """A node's value as an int (enumerations give their integer value), None if unreadable."""
    try:
        if type(node).__name__ == "IEnumeration":
            return int(node.get_int_value())
        value = node.value
    except (GenApiError, GenTLError):
        return None
    if isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, float):
        return int(round(value))
    return None


class GenicamCamera:
    """A GenICam camera through a GenTL producer (harvesters); see the Source protocol.

    ``open`` configures the device and fails with SourceError; ``frames`` never raises for a lost
    camera: it reopens it with exponential backoff and keeps frame ids increasing. Lost means: a
    fetch or start raises, the acquirer was destroyed, a fetch timeout whose probe read of
    ``Width`` fails, or a free-running camera (no TriggerMode, or Off) silent for
    ``STALL_TIMEOUTS`` fetch timeouts; a triggered camera may be silent indefinitely. One producer
    (.cti) serves one open GenicamCamera per process: close the old one before opening a new one.
    """

    def __init__(self, cfg: GenicamSource):
        self.cfg = cfg
        self.name = cfg.camera
        self.height = 0
        self.width = 0
        self.channels = cfg.channels
        self.status = SourceStatus()
        self.model = "camera"
        self.pixel_format = ""
        self._harvester: Harvester | None = None
        self._ia: ImageAcquirer | None = None
        self._lock = threading.RLock()  # guards _ia between frames() and close()
        self._closed = False
        self._ids = FrameIdSequencer()
        self._resizer: Resizer | None = None
        self._has_trigger = False
        self._free_running = True
        self._stall_s = 0.0
        self._cam_width = self._cam_height = 0
        self._opened_shape = (0, 0)
        self._producer_key = ""

    # ------------------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        """Load the producer, open and configure the device; SourceError on any problem."""
        cti = Path(self.cfg.cti)
        if not cti.is_file():
            raise SourceError(f"GenTL producer '{cti}' not found")
        self._closed = False
        key = str(cti.resolve())
        with _producers_lock:
            if key in _producers_in_use:
                raise SourceError(f"GenTL producer '{cti}' is already in use by another camera in "
                                  "this process (close it first)")
            _producers_in_use.add(key)
        self._producer_key = key
        self._harvester = Harvester()
        try:
            self._harvester.add_file(str(cti), check_existence=True, check_validity=True)
            self._harvester.update()
        except (GenTLError, OSError, ValueError) as exc:
            self._release_harvester()
            raise SourceError(f"cannot load GenTL producer '{cti}': {exc}") from None
        try:
            self._connect()
        except SourceError:
            self.close()
            raise
        except (GenTLError, GenApiError) as exc:
            self.close()
            raise SourceError(f"cannot configure {self.model}: {exc}") from None
        self._opened_shape = (self._cam_height, self._cam_width)
        self.height = self.cfg.height or self._cam_height
        self.width = self.cfg.width or self._cam_width
        self._resizer = None
        self.status.connected = True
        logger.info("opened %s: %s %dx%d %s -> %dx%dx%d", self.name, self.model, self._cam_width,
                    self._cam_height, self.pixel_format, self.width, self.height, self.channels)

    def close(self) -> None:
        """Stop acquisition and release the device and the producer (idempotent)."""
        self._closed = True
        with self._lock:
            self._release_acquirer()
            self._release_harvester()
        self.status.connected = False

    def _connect(self) -> None:
        """Create the acquirer for the configured device and configure it (harvester loaded)."""
        assert self._harvester is not None
        infos = self._harvester.device_info_list
        if not infos:
            raise SourceError(f"GenTL producer '{self.cfg.cti}' reports no device")
        if self.cfg.serial is not None:
            matches = [i for i in infos if str(i.serial_number) == self.cfg.serial]
            if not matches:
                raise SourceError(f"no device with serial '{self.cfg.serial}' (found: "
                                  f"{[str(i.serial_number) for i in infos]})")
            info = matches[0]
        else:
            if self.cfg.device_index >= len(infos):
                raise SourceError(f"device_index {self.cfg.device_index} but the producer has "
                                  f"{len(infos)} device(s)")
            info = infos[self.cfg.device_index]
        self.model = f"{info.model} (serial {info.serial_number})"
        try:
            with _sigint_preserved():
                self._ia = self._harvester.create(info)
        except (GenTLError, GenApiError, ValueError) as exc:
            raise SourceError(f"cannot open {self.model}: {exc}") from None
        nm = self._ia.remote_device.node_map
        apply_nodes(nm, self.cfg.nodes, self.model)
        self._check_camera(nm)
        self._setup_stream()

    def _check_camera(self, nm: Any) -> None:
        """Read size and format, and check the trigger and line-value nodes the config needs."""
        for needed in ("Width", "Height", "PixelFormat"):
            if _node(nm, needed) is None:
                raise SourceError(f"camera node '{needed}' does not exist on {self.model}")
        self._cam_width, self._cam_height = int(nm.Width.value), int(nm.Height.value)
        self.pixel_format = str(nm.PixelFormat.value)
        if not is_supported(self.pixel_format):
            raise SourceError(f"camera node 'PixelFormat' = '{self.pixel_format}' on {self.model}: "
                              "linewatch cannot convert this format (use Mono8/10/12/16, RGB8, "
                              "BGR8, RGBa8, BGRa8 or Bayer**8)")
        trigger_mode = _node(nm, "TriggerMode")
        self._free_running = trigger_mode is None or str(trigger_mode.value) == "Off"
        rate = _node(nm, "AcquisitionFrameRate")
        try:
            period_s = 1.0 / float(rate.value) if rate is not None else 0.0
        except (GenApiError, ZeroDivisionError):
            period_s = 0.0
        self._stall_s = max(STALL_TIMEOUTS * self.cfg.fetch_timeout_s,
                            STALL_FRAME_PERIODS * period_s)
        self._has_trigger = _node(nm, "TriggerSoftware") is not None
        if self.cfg.software_trigger_fps > 0 and not self._has_trigger:
            raise SourceError(f"software_trigger_fps = {self.cfg.software_trigger_fps} but camera "
                              f"node 'TriggerSoftware' does not exist on {self.model}")
        if self.cfg.line_value_node and _node(nm, self.cfg.line_value_node) is None:
            raise SourceError(f"camera node '{self.cfg.line_value_node}' (line_value_node) does "
                              f"not exist on {self.model}")

    def _setup_stream(self) -> None:
        """OldestFirst buffer handling with ``buffer_count`` buffers."""
        assert self._ia is not None
        wanted = self.cfg.buffer_count
        minimum = self._ia.min_num_buffers
        if wanted < minimum:
            logger.warning("%s needs at least %d buffers; buffer_count %d raised", self.model,
                           minimum, wanted)
        self._ia.num_buffers = max(wanted, minimum)
        for stream in self._ia.data_streams:
            mode = _node(stream.node_map, "StreamBufferHandlingMode")
            if mode is None:
                logger.warning("%s: no StreamBufferHandlingMode node; producer default kept",
                               self.model)
                continue
            try:
                mode.value = "OldestFirst"
            except GenApiError as exc:
                why = _why_refused(mode, "OldestFirst", exc)
                raise SourceError(f"stream node 'StreamBufferHandlingMode' = 'OldestFirst' "
                                  f"refused by {self.model}: {why}") from None

    def _release_acquirer(self) -> None:
        ia, self._ia = self._ia, None
        if ia is None:
            return
        try:
            ia.destroy()
        except _LOSS_ERRORS as exc:  # a device that already vanished cannot be released cleanly
            logger.debug("releasing %s: %s", self.model, exc)

    def _release_harvester(self) -> None:
        h, self._harvester = self._harvester, None
        if h is not None:
            try:
                h.reset()
            except (GenTLError, GenApiError) as exc:
                logger.debug("resetting harvester: %s", exc)
        with _producers_lock:
            _producers_in_use.discard(self._producer_key)
        self._producer_key = ""

    # -------------------------------------------------------------------------------- frames
    def frames(self, stop: threading.Event) -> Iterator[SourceFrame]:
        """Yield frames until ``stop`` is set or ``close`` is called; reopen a lost camera."""
        period_s = 1.0 / self.cfg.software_trigger_fps if self.cfg.software_trigger_fps > 0 else 0.0
        next_trigger = last_frame = time.monotonic()
        try:
            while not stop.is_set() and not self._closed:
                self.status.t_alive = time.monotonic()  # each fetch ends within fetch_timeout_s
                if self._ia is None:
                    if not self._reopen(stop):
                        return
                    last_frame = time.monotonic()
                if period_s:
                    wait_s = next_trigger - time.monotonic()
                    if wait_s > 0 and stop.wait(wait_s):
                        return
                    next_trigger = max(next_trigger + period_s, time.monotonic())
                try:
                    frame = self._grab(fire_trigger=bool(period_s))
                except _LOSS_ERRORS as exc:
                    if stop.is_set() or self._closed:
                        return
                    self._lost(f"{type(exc).__name__}: {exc}")
                    continue
                if frame is None:
                    silent_s = time.monotonic() - last_frame
                    if self._free_running and silent_s >= self._stall_s:
                        self._lost(f"free-running camera sent no frame for {silent_s:.1f} s")
                    continue
                yield frame
                last_frame = time.monotonic()  # silence counts only while waiting on the camera
        finally:
            with self._lock:
                if self._ia is not None and not self._closed:
                    try:
                        self._ia.stop()
                    except _LOSS_ERRORS as exc:
                        logger.debug("stopping %s: %s", self.model, exc)

    def _grab(self, fire_trigger: bool) -> SourceFrame | None:
        """One buffer -> one frame, or None on a fetch timeout (then the device is probed)."""
        with self._lock:
            ia = self._ia
            if ia is None or not ia.is_valid():
                raise RuntimeError("the image acquirer was destroyed")
            if not ia.is_acquiring():
                ia.start()
            nm = ia.remote_device.node_map
            if fire_trigger:
                nm.TriggerSoftware.execute()
            try:
                buffer = ia.fetch(timeout=self.cfg.fetch_timeout_s)
            except TimeoutException:
                _ = nm.Width.value  # raises when the device is gone; silence alone is not loss
                return None
            t_capture = time.time()
            try:
                raw_id = _buffer_frame_id(buffer)
                line_value = None
                if self.cfg.line_value_node:
                    line_value = _read_int(getattr(nm, self.cfg.line_value_node))
                image, fault = self._pixels(buffer)
            finally:
                buffer.queue()
        frame_id = self._ids.next(raw_id)
        meta = FrameMeta(frame_id=frame_id, t_capture=t_capture, camera=self.name,
                         height=self.height, width=self.width, line_value=line_value)
        if raw_id is not None:
            meta.extra["device_frame_id"] = raw_id
        if fault:
            meta.extra["fault"] = fault
            self.status.corrupt_frames += 1
        return SourceFrame(image=image, meta=meta)

    def _pixels(self, buffer: Any) -> tuple[np.ndarray, str]:
        """Copy the buffer's pixels out as HxWxC uint8; a frame that cannot be read is zeros."""
        try:
            comp = buffer.payload.components[0]
            fmt = comp.data_format
            h, w = int(comp.height), int(comp.width)
            if h <= 0 or w <= 0:
                raise ValueError(f"empty {w}x{h} image")
            rgb = convert_pixels(comp.data, fmt, h, w)
            img = fit_channels(rgb, self.channels)
            if img.shape[:2] != (self.height, self.width):
                if self._resizer is None or self._resizer.src_shape != img.shape[:2]:
                    self._resizer = Resizer(img.shape[:2], (self.height, self.width))
                img = self._resizer(img)
            elif not img.flags.owndata:
                img = img.copy()  # the buffer goes back to the producer before the frame is used
        except (IndexError, ValueError, KeyError, GenTLError, GenApiError) as exc:
            # one bad buffer is a FAULT frame, not a lost camera (these errors would otherwise
            # reach frames() as camera loss and tear the camera down)
            blank = np.zeros((self.height, self.width, self.channels), np.uint8)
            return blank, f"undecodable: {exc}"
        return img, ""

    # ----------------------------------------------------------------------------- recovery
    def _lost(self, why: str) -> None:
        """Mark the camera lost and release it; ``frames`` reopens it."""
        logger.warning("camera %s (%s) lost: %s; reopening", self.name, self.model, why)
        self.status.connected = False
        self.status.last_error = why
        with self._lock:
            self._release_acquirer()

    def _reopen(self, stop: threading.Event) -> bool:
        """Reopen with exponential backoff until it works; False when stopped first."""
        first_s, longest_s = self.cfg.reopen_backoff_s
        delay_s = max(first_s, 0.0)
        while not stop.is_set() and not self._closed:
            if not self._sleep(stop, delay_s):
                return False
            try:
                with self._lock:
                    if self._harvester is None:
                        raise SourceError("producer released")
                    self._harvester.update()
                    self._connect()
            except (SourceError, *_LOSS_ERRORS) as exc:
                self.status.last_error = f"reopen failed: {exc}"
                delay_s = min(max(delay_s * 2, first_s, 0.05), longest_s)
                logger.warning("camera %s: reopen failed (%s); next try in %.1f s", self.name, exc,
                               delay_s)
                with self._lock:
                    self._release_acquirer()
                continue
            if self._closed:
                return False
            if (self._cam_height, self._cam_width) != self._opened_shape:
                logger.warning("camera %s came back as %dx%d; frames resized to %dx%d", self.name,
                               self._cam_width, self._cam_height, self.width, self.height)
            self._ids.reopened()  # its counter starts again: not a wrap
            self.status.reopen_count += 1
            self.status.connected = True
            logger.info("camera %s reopened (%d reopens so far)", self.name,
                        self.status.reopen_count)
            return True
        return False

    def _sleep(self, stop: threading.Event, delay_s: float) -> bool:
        """Wait ``delay_s``, waking early for ``stop`` or ``close``; False when woken."""
        end = time.monotonic() + delay_s
        while not self._closed:
            left_s = end - time.monotonic()
            if left_s <= 0:
                return True
            if stop.wait(min(left_s, 0.1)):
                return False
        return False


def _buffer_frame_id(buffer: Any) -> int | None:
    """The producer's frame id (GenTL BUFFER_INFO_FRAMEID, the block id on GigE), if it has one."""
    try:
        return int(buffer.module.frame_id)
    except (GenTLError, AttributeError):
        return None
