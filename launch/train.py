"""Entry script for ``accelerate launch launch/train.py ...`` and ``python launch/train.py ...``.

Arguments go to ``crop-accel train`` unless the first one names another subcommand.
"""

import sys
from pathlib import Path

# Running from a clone without `pip install` still finds the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crop_accel.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_command="train"))
