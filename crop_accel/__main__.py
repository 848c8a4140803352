import sys

from crop_accel.cli import main

sys.exit(main())
