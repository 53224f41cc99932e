"""``python -m unipeft``: the command line (what ``torchrun -m unipeft train CONFIG`` starts on every rank)."""

import sys

from unipeft.cli.main import main

sys.exit(main())
