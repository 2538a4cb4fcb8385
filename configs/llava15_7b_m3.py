"""`--config configs/llava15_7b_m3.py[:ARG]` from a checkout. The config itself is m3_jax/configs/llava15_7b_m3.py, shipped with the
package (an installed m3-jax also takes `--config llava15_7b_m3`)."""
from m3_jax.configs.llava15_7b_m3 import get_config  # noqa: F401
