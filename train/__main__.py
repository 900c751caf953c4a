"""``python -m train CONFIG.yaml [key=value ...]``."""

import sys

from train.cli import main

sys.exit(main())
