"""``python -m fam.cli ...`` (also ``torchrun -m fam.cli``): the ``fam`` command line."""
import sys

from fam.cli import main

if __name__ == "__main__":
    sys.exit(main())
