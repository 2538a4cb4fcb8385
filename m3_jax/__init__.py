"""m3-jax: Matryoshka Multimodal Models (Cai et al., 2024) in JAX/Flax."""

__version__ = "0.1.0"


def load(ckpt: str, **kwargs):
  """Loads an m3 checkpoint (or a training workdir's latest step) as a model with `.generate(...)`."""
  from m3_jax.eval.loader import load as _load
  return _load(ckpt, **kwargs)
