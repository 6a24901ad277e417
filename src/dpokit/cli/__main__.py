"""`python -m dpokit.cli`: the `dpokit` command, as `accelerate launch -m dpokit.cli` runs it."""

import sys

from dpokit.cli.main import main

sys.exit(main())
