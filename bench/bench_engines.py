"""Models x backends benchmark (frames/s, p50/p99, peak memory, torch eager baseline in the same
run), the same as ``linewatch bench engines``; appends to bench/RESULTS.md unless --no-append.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_engines.py --threads 1 [--models patch_features,dqformer,ard]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linewatch.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["bench", "engines", *sys.argv[1:]]))
