"""``python -m train CONFIG.yaml [key=value ...]``."""

import sys

from .run import main

sys.exit(main())
