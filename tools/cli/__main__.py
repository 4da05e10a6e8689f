"""``python -m tools.cli``: the ``logitstore`` command as a module (what ``torchrun -m`` runs)."""

import sys

from tools.cli import main

sys.exit(main())
