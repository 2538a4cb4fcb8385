"""`--config configs/tiny.py[:ARG]` from a checkout. The config itself is m3_jax/configs/tiny.py, shipped with the
package (an installed m3-jax also takes `--config tiny`)."""
from m3_jax.configs.tiny import get_config  # noqa: F401
