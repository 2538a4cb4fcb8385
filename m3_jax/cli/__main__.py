"""`python -m m3_jax.cli ...` is the `m3` command (launchers use this form)."""
import sys

from m3_jax.cli import main

sys.exit(main())
