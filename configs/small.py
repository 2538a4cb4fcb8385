"""`--config configs/small.py[:ARG]` from a checkout. The config itself is m3_jax/configs/small.py, shipped with the
package (an installed m3-jax also takes `--config small`)."""
from m3_jax.configs.small import get_config  # noqa: F401
