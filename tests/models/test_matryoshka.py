"""Nested pooling against plain numpy block means and index arithmetic."""
import jax.numpy as jnp
import numpy as np
import pytest

from m3_jax.models.config import M3Config, ModelConfig, VisionConfig
from m3_jax.models.matryoshka import nested_pool


def block_mean(grid: np.ndarray, k: int) -> np.ndarray:
  b, g, _, c = grid.shape
  return grid.reshape(b, g // k, k, g // k, k, c).mean(axis=(2, 4)).reshape(b, -1, c)


@pytest.fixture
def tokens():
  return np.random.default_rng(0).normal(size=(2, 24 * 24, 5)).astype(np.float32)


@pytest.mark.parametrize("scale,k", [(576, 1), (144, 2), (36, 4), (9, 8), (1, 24)])
def test_avg_pool_is_block_mean(tokens, scale, k):
  out = np.asarray(nested_pool(jnp.asarray(tokens), scale, "avg"))
  np.testing.assert_allclose(out, block_mean(tokens.reshape(2, 24, 24, 5), k), rtol=1e-5, atol=1e-6)


def test_avg_chain_equals_papers_sequential_2x2_2x2_2x2_3x3(tokens):
  """Paper Sec. 3: 2x2 pooling three times, then 3x3; pooling straight from the grid must agree."""
  x = tokens.reshape(2, 24, 24, 5)
  for k, scale in [(2, 144), (2, 36), (2, 9), (3, 1)]:
    x = block_mean(x, k).reshape(2, int(np.sqrt(scale)), int(np.sqrt(scale)), 5)
    np.testing.assert_allclose(np.asarray(nested_pool(jnp.asarray(tokens), scale)), x.reshape(2, scale, 5),
                               rtol=1e-5, atol=1e-6)


def test_spatial_sampling_takes_top_left_of_each_window_and_nests(tokens):
  grid = tokens.reshape(2, 24, 24, 5)
  sets = {}
  for scale, k in [(144, 2), (36, 4), (9, 8), (1, 24)]:
    out = np.asarray(nested_pool(jnp.asarray(tokens), scale, "spatial"))
    np.testing.assert_array_equal(out, grid[:, ::k, ::k].reshape(2, scale, 5))
    sets[scale] = {tuple(v) for v in out[0].round(6)}
  assert sets[1] <= sets[9] <= sets[36] <= sets[144]


def test_sequential_sampling_takes_the_first_tokens(tokens):
  np.testing.assert_array_equal(np.asarray(nested_pool(jnp.asarray(tokens), 36, "sequential")), tokens[:, :36])


@pytest.mark.parametrize("scale", [10, 25, 0])
def test_invalid_scale_names_the_grid(tokens, scale):
  with pytest.raises(ValueError, match=f"scale {scale} is not a square whose side divides the 24x24 grid"):
    nested_pool(jnp.asarray(tokens), scale)


def test_config_rejects_scales_outside_the_chain():
  cfg = ModelConfig(vision=VisionConfig(image_size=48, patch_size=2), m3=M3Config(scales=(576, 144, 36, 9, 1)))
  with pytest.raises(ValueError, match="scale 10 is not one of 1, 9, 36, 144, 576"):
    cfg.check_scale(10)
  with pytest.raises(ValueError, match="scale 25 in model.m3.scales is not a square whose side divides the 24x24"):
    ModelConfig(vision=VisionConfig(image_size=48, patch_size=2), m3=M3Config(scales=(576, 25)))
