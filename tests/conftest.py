"""Shared test settings: where the local copy of Multi30k lives.

`make test` sets AIAYN_DATA=../shared/data/multi30k; without it the tests look beside the
repository (../shared/data/multi30k), the layout of this project's machines and CI.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MULTI30K = Path(os.environ.get("AIAYN_DATA") or ROOT.parent / "shared" / "data" / "multi30k").resolve()
