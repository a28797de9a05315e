"""``python -m trimtab.controller`` is ``trimtab``."""

import sys

from trimtab.controller.cli import main

sys.exit(main())
