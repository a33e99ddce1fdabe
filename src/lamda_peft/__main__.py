"""`python -m lamda_peft ...` (and `accelerate launch -m lamda_peft ...`) runs the CLI."""

import sys

from lamda_peft.cli import main

sys.exit(main())
