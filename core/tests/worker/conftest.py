"""Makes the worker test doubles (worker_fakes.py) importable from the tests beside it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
