import os
import sys
from pathlib import Path

# The modules live flat at the repository root; tests import them as `import data`, `import mtv`, ...
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
