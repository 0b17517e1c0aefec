"""The experiments' tests reuse the data-folder writers and skip marks of ``repro/tests/datasets``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datasets"))
