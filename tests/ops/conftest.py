"""Makes the float64 reference (`ops_reference.py`) importable from the tests here."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
