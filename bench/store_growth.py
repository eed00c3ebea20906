"""How fast the SQL history grows: N frames written through the store writer into a fresh SQLite
file (a tier-1 and a tier-2 row per frame, one frame in 20 NG with one region), then bytes per
frame and per day at 25 frames/s. `[store] retention_days` bounds it.

    python bench/store_growth.py [N]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linewatch.config import StoreConfig  # noqa: E402
from linewatch.frames import FrameMeta, Region, Result, Verdict  # noqa: E402
from linewatch.store import StoreWriter  # noqa: E402

FPS = 25


def main(n: int) -> None:
    folder = Path(tempfile.mkdtemp())
    w = StoreWriter(StoreConfig(url=f"sqlite:///{folder}/lw.db", spool_dir=folder / "spool"), "line1",
                    queue_size=4 * n + 16)
    w.start()
    t0 = time.time()
    for i in range(n):
        t = t0 + i / FPS
        for tier in (1, 2):
            regions = [Region((10, 10, 40, 30), 420, 3.1, "defect")] if i % 20 == 0 else []
            meta = FrameMeta(i, t, "cam0", 256, 256, lot_id=f"L{i // 32}")
            w.submit_result(Result(meta, Verdict.NG if regions else Verdict.OK, 1.23, regions,
                                   {"name": "zeroshot", "version": "zs-1"}, threshold=2.0,
                                   t_inspected=t + 0.05, tier=tier), t + 0.06)
    w.stop(120)
    size = sum(f.stat().st_size for f in folder.glob("lw.db*"))
    per_frame = size / n
    print(f"{n} frames (tier 1 + tier 2 rows, 5% NG with a region): {size / 1e6:.1f} MB, "
          f"{per_frame:.0f} B/frame, {per_frame * FPS * 86400 / 1e9:.2f} GB/day at {FPS} frames/s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40000)
