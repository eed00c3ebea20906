"""The `linewatch` command: run | check-config | replay | tail | ctl | eval | bench | engines | train.

``main(argv)`` returns the exit code; errors a line engineer can fix are one line on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from . import __version__
from .config import load_or_report

logger = logging.getLogger("linewatch")

DEFAULT_CONFIG = "config.toml"


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s [%(threadName)s] %(name)s: %(message)s")
    # alembic narrates every migration step at INFO; the store logs the outcome itself
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_or_report(args.config)
    if cfg is None:
        return 1
    if args.print:
        from .config import to_toml

        print(to_toml(cfg))
    else:
        print(f"{args.config}: OK")
    return 0


def _run_daemon(cfg, config_path: Path | None, exit_at_source_end: bool = False) -> int:
    from .daemon import Daemon, StartupError

    try:
        daemon = Daemon(cfg, config_path, exit_at_source_end=exit_at_source_end)
        return daemon.run()
    except StartupError as exc:
        print(f"linewatch: cannot start: {exc}", file=sys.stderr)
        return 1


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_or_report(args.config)
    if cfg is None:
        return 1
    _setup_logging(cfg.daemon.log_level)
    return _run_daemon(cfg, Path(args.config))


def cmd_replay(args: argparse.Namespace) -> int:
    """Run the daemon with the source replaced by a folder replay, stop at its end."""
    from .config import ReplaySource

    cfg = load_or_report(args.config)
    if cfg is None:
        return 1
    if not Path(args.folder).is_dir():
        print(f"linewatch replay: folder not found: {args.folder}", file=sys.stderr)
        return 1
    src = ReplaySource(path=Path(args.folder), fps=args.fps, loop=False, width=args.width, height=args.height,
                       channels=cfg.source.channels, camera="replay0")
    cfg = cfg.model_copy(update={"source": src})
    _setup_logging(cfg.daemon.log_level)
    return _run_daemon(cfg, Path(args.config), exit_at_source_end=True)


def cmd_tail(args: argparse.Namespace) -> int:
    """Subscribe and print results as a PLC would see them; report seq gaps."""
    import zmq

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.connect(args.endpoint)
    sock.setsockopt_string(zmq.SUBSCRIBE, args.topic)
    # seq counts every message of a line, all topics: with one topic only, gaps are expected
    whole_line = len([w for w in args.topic.split(".")[2:] if w]) == 0
    if not whole_line:
        print(f"-- topic {args.topic!r} is one kind of message: seq gaps are not counted", file=sys.stderr)
    last_seq: dict[str, int] = {}  # per line
    gaps = n = restarts = 0
    t_end = time.monotonic() + args.seconds if args.seconds else None
    try:
        while args.count == 0 or n < args.count:
            if t_end is not None and time.monotonic() > t_end:
                break
            if not sock.poll(200):
                continue
            parts = sock.recv_multipart()
            header = json.loads(parts[1])
            seq, line = header.get("seq"), header.get("line", "")
            last = last_seq.get(line)
            if whole_line and last is not None and isinstance(seq, int):
                if seq <= last:  # a restarted daemon numbers from 1 again: not a gap, unknown loss
                    restarts += 1
                    print(f"!! publisher restarted (seq {last} -> {seq}); messages lost meanwhile are "
                          "not known", flush=True)
                elif seq != last + 1:
                    gaps += seq - last - 1
                    print(f"!! seq gap: {seq - last - 1} message(s) missing before seq {seq}", flush=True)
            if isinstance(seq, int):
                last_seq[line] = seq
            n += 1
            if args.json:
                print(json.dumps(header), flush=True)
            else:
                print(_one_line(parts[0].decode(), header, len(parts) > 2), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close(linger=0)
    print(f"-- {n} messages, " + (f"{gaps} missing (seq gaps)" if whole_line else "seq gaps not counted")
          + (f", {restarts} publisher restarts" if restarts else ""), file=sys.stderr)
    return 0


def _one_line(topic: str, h: dict, has_payload: bool) -> str:
    kind = h.get("kind")
    if kind == "frame":
        regions = h.get("regions") or []
        score = h.get("score")
        return (f"{h['seq']:>7} {topic} lot={h.get('lot_id')} frame={h.get('frame_id')} tier={h.get('tier')} "
                f"{h.get('verdict'):<13} score={'-' if score is None else f'{score:.3f}'} "
                f"regions={len(regions)}{' +png' if has_payload else ''}"
                f"{' reason=' + h['reason'] if h.get('reason') else ''}")
    if kind == "lot":
        refined = h.get("refined")
        extra = f" refined={len(refined)}" if refined is not None else ""
        return (f"{h['seq']:>7} {topic} {h.get('event')} lot={h.get('lot_id')} recipe={h.get('recipe')} "
                f"reason={h.get('reason')} n={h.get('n_frames')}{extra} {h.get('summary') or ''}")
    if kind == "heartbeat":
        return f"{h['seq']:>7} {topic} frames_in={h.get('frames_in')} verdicts={h.get('verdicts')}"
    return f"{h.get('seq', '?'):>7} {topic} {json.dumps(h)}"


def cmd_ctl(args: argparse.Namespace) -> int:
    from .control import RELOAD_WAIT_S, request

    timeout_s = args.timeout
    if timeout_s is None:  # a reload is answered when it is done: up to the daemon's own wait
        timeout_s = RELOAD_WAIT_S + 10.0 if args.command[:1] == ["reload"] else 10.0
    try:
        # quoted as the shell gave the words: a lot id or recipe with a space stays one word
        reply = request(args.endpoint, shlex.join(args.command), timeout_s=timeout_s)
    except TimeoutError as exc:
        print(f"linewatch ctl: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2))
    return 0 if reply.get("ok") else 1


# subcommands implemented in their own modules: (module, help). Each module offers
# add_arguments(parser) and run(args) -> int, and is imported only when used.
PLUGIN_COMMANDS = {
    "eval": ("linewatch.evaluate", "evaluate engines on a data set and write a report"),
    "bench": ("linewatch.benchmark", "benchmark the engines and the daemon"),
    "synth": ("linewatch.acquire.export", "write the synthetic line to disk as labelled lots (for eval/replay)"),
    "engines": ("linewatch.runtime.cli", "export ONNX models, build TensorRT plans, list engine artifacts"),
    "train": ("linewatch.refer", "train a model (dqformer) or build a referring data file (build-refer)"),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; plugin modules are imported only for the ``selected`` command."""
    p = argparse.ArgumentParser(prog="linewatch", description="streaming inspection daemon")
    p.add_argument("--version", action="version", version=f"linewatch {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("run", help="run the daemon")
    s.add_argument("--config", "-c", default=os.environ.get("LINEWATCH_CONFIG", DEFAULT_CONFIG))
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("check-config", help="validate a config file (exit 0/1)")
    s.add_argument("config", nargs="?", default=os.environ.get("LINEWATCH_CONFIG", DEFAULT_CONFIG))
    s.add_argument("--print", action="store_true", help="print the effective config, defaults filled in")
    s.set_defaults(fn=cmd_check_config)

    s = sub.add_parser("replay", help="replay a folder of images through the daemon, then stop")
    s.add_argument("folder")
    s.add_argument("--config", "-c", default=os.environ.get("LINEWATCH_CONFIG", DEFAULT_CONFIG))
    s.add_argument("--fps", type=float, default=0.0, help="0 = as fast as possible")
    s.add_argument("--width", type=int, default=0)
    s.add_argument("--height", type=int, default=0)
    s.set_defaults(fn=cmd_replay)

    s = sub.add_parser("tail", help="print published results live, report seq gaps")
    s.add_argument("endpoint", nargs="?", default="tcp://127.0.0.1:5556")
    s.add_argument("--topic", default="linewatch.", help="topic prefix to subscribe to")
    s.add_argument("--count", type=int, default=0, help="stop after N messages (0 = never)")
    s.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0 = never)")
    s.add_argument("--json", action="store_true", help="print raw JSON headers")
    s.set_defaults(fn=cmd_tail)

    s = sub.add_parser("ctl", help="send a control command (lot start ID RECIPE | lot end | status | reload)")
    s.add_argument("command", nargs="+")
    s.add_argument("--endpoint", default="tcp://127.0.0.1:5557")
    s.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for the reply (default 10; 70 for reload, which replies when done)")
    s.set_defaults(fn=cmd_ctl)

    for name, (module, help_) in PLUGIN_COMMANDS.items():
        s = sub.add_parser(name, help=help_)
        s.set_defaults(plugin=module)
        if name == selected:
            _plugin_args(s, module)
    return p


def _plugin_args(parser: argparse.ArgumentParser, module: str) -> None:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        parser.set_defaults(plugin_error=f"{module} unavailable: {exc}")
        return
    mod.add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if getattr(args, "plugin_error", None):
        print(f"linewatch {args.cmd}: {args.plugin_error}", file=sys.stderr)
        return 1
    if getattr(args, "plugin", None):
        _setup_logging()
        from .config import ConfigError
        from .refer.data import ReferDataError

        try:
            return importlib.import_module(args.plugin).run(args)
        except (ConfigError, ReferDataError, FileNotFoundError, ValueError) as exc:  # bad input: no traceback
            print(f"linewatch {args.cmd}: {exc}", file=sys.stderr)
            return 1
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
