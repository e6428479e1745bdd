"""`python -m flux.training ...` is `flux train ...` (flux/training/command.py)."""

import sys

from flux.training.command import main

if __name__ == "__main__":
    sys.exit(main())
