"""Run bqemulator on loopback for the BigQuery backend tests (`python tests/bq_emulator.py ...`).

bqemulator insists on DuckDB's spatial extension at start-up (for GEOGRAPHY), which it
downloads from extensions.duckdb.org; offline that fails and the server never starts. The
cohort queries use no GEOGRAPHY, so this launcher lets the server start without the
extension when it cannot be loaded, then hands over to bqemulator's own CLI unchanged.
"""

from __future__ import annotations

import sys

from bqemulator.cli import main
from bqemulator.storage import engine


def _load_spatial_if_available(self: engine.DuckDBEngine) -> None:
    try:
        _original(self)
    except Exception as exc:
        print(f"bq_emulator: running without GEOGRAPHY support ({exc})", file=sys.stderr)


_original = engine.DuckDBEngine._load_spatial
engine.DuckDBEngine._load_spatial = _load_spatial_if_available

if __name__ == "__main__":
    sys.exit(main())
