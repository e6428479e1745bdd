"""`python -m flux` is the `flux` command (flux/cli/main.py)."""

import sys

from flux.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
