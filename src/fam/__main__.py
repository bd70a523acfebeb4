"""``python -m fam ...`` runs the ``fam`` command line (also under ``torchrun -m fam``)."""
import sys

from fam.cli import main

if __name__ == "__main__":
    sys.exit(main())
