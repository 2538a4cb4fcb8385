"""`python -m m3_jax ...` is the `m3` command."""
import sys

from m3_jax.cli import main

sys.exit(main())
