"""Sharding: batch sharding follows the "batch" rule, a logical name without a rule is an error, and activation
constraints pin the layout under `activation_layout` and change no number (nothing without it)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3_jax import sharding
from m3_jax.configs import base as m3_config
from m3_jax.models import llava
from m3_jax.models.config import ModelConfig
from m3_jax.sharding import BATCH, EMBED, LENGTH, MLP, NamedSharding, P


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh((2, 2, 2))


def test_batch_sharding_is_built_from_the_batch_rule(mesh):
  assert sharding.batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)
  data_only = tuple((name, "data") if name == BATCH else (name, t) for name, t in sharding.DEFAULT_RULES)
  assert sharding.batch_sharding(mesh, 2, data_only).spec == P("data", None)
  batch = sharding.shard_batch({"x": np.arange(16.0).reshape(8, 2)}, mesh, data_only)
  assert batch["x"].sharding.spec == P("data", None) and len(batch["x"].addressable_shards) == 8


def test_run_config_rules_are_the_sharding_table():
  assert m3_config.base().mesh.rules == sharding.DEFAULT_RULES


def test_a_logical_name_without_a_rule_is_an_error_naming_it_and_the_known_names(mesh):
  with pytest.raises(ValueError, match=r"logical axis 'heds' \(of \('embed', 'heds'\)\) has no rule in mesh.rules; "
                                       r"the rules name batch, length, embed, vit_embed, heads, kv, mlp, vocab, "
                                       r"layers, norm, conv"):
    sharding.logical_to_mesh_axes((EMBED, "heds"))
  no_mlp = tuple(r for r in sharding.DEFAULT_RULES if r[0] != MLP)
  with pytest.raises(ValueError, match=r"logical axis 'mlp' .* has no rule"):
    sharding.logical_shardings(llava.abstract_params(ModelConfig.from_config(m3_config.load("tiny").model)), mesh,
                               no_mlp)
  with sharding.activation_layout(mesh):
    with pytest.raises(ValueError, match=r"logical axis 'hidden' .* has no rule"):
      jax.jit(lambda x: sharding.constrain(x, (BATCH, "hidden")))(jnp.zeros((8, 4)))


def test_constrain_pins_the_layout_only_under_activation_layout(mesh):
  x = jnp.zeros((8, 4, 6))
  pin = jax.jit(lambda x: sharding.constrain(x, (BATCH, LENGTH, EMBED)))
  assert sharding.constrain(x, (BATCH, LENGTH, EMBED)) is x
  assert len(pin(x).sharding.device_set) == 1
  with sharding.activation_layout(mesh):  # the same jitted function: traced again under the layout
    # batch takes ("data", "fsdp"), so embed (-> "fsdp") stays whole; a batch of 3 does not divide: replicated.
    assert pin(x).sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, None)), 3)
    assert pin(jnp.zeros((3, 4, 6))).sharding.is_fully_replicated


def test_model_forward_under_the_layout_is_pinned_and_unchanged(mesh):
  cfg = ModelConfig.from_config(m3_config.load("tiny").model)
  params = llava.init_params(cfg, jax.random.key(0))
  model = llava.LlavaM3(cfg)
  ids = jnp.array([[1, cfg.image_token_id, 5, 6, 7]] * 4, jnp.int32)
  pixels = jax.random.normal(jax.random.key(1), (4, 48, 48, 3))
  forward = lambda p, i, x: model.apply({"params": p}, i, x, 9)
  fn = jax.jit(forward)
  assert "sharding_constraint" not in fn.lower(params, ids, pixels).as_text()
  want = fn(params, ids, pixels)
  sharded_params = jax.device_put(params, sharding.logical_shardings(llava.abstract_params(cfg), mesh))
  with sharding.activation_layout(mesh):
    text = fn.lower(sharded_params, ids, pixels).as_text()
    got = fn(sharded_params, ids, pixels)
  # Residual streams (3 per block), q/k/v/o and the MLP hidden, in the ViT's and the LLM's scanned block.
  assert text.count("sharding_constraint") >= 2 * 8
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
