"""`python -m rim_lens.cli`: the command line (used under `accelerate launch`)."""

import sys

from rim_lens.cli import main

sys.exit(main())
