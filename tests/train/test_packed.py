"""`train.scale_loss="packed"`: the coarse scales in one decoder pass with a block-diagonal mask give `loop`'s
per-scale cross-entropy and its gradient (float32 tolerance), text-only and padded rows included."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from m3_jax.models import llava
from m3_jax.train import objective as obj
from m3_jax.train.state import model_config_of

from train_testlib import FAST_COMPILE, batch_of, small_config


def test_packed_equals_loop_loss_and_gradient():
  config = small_config(**{"train.batch_size": 3, "train.scales": "(144, 36, 9, 1)"})
  mc = model_config_of(config)
  model = llava.LlavaM3(mc)
  params = llava.init_params(mc, jax.random.PRNGKey(1))
  batch = batch_of(config)
  # Row 2 is text-only and one token shorter (right padding): its segments carry padding inside the packed row.
  ids, labels, mask = batch["input_ids"].copy(), batch["labels"].copy(), batch["attention_mask"].copy()
  ids[2, 1:-1], ids[2, -1] = ids[2, 2:], mc.pad_token_id
  labels[2, 1:-1], labels[2, -1] = labels[2, 2:], -100
  mask[2, 1:-1], mask[2, -1] = mask[2, 2:], 0
  batch.update(input_ids=ids, labels=labels, attention_mask=mask)
  batch["has_image"][2] = False
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  scales = (144, 36, 9, 1)
  n = obj.count_targets(batch, mc.image_token_id)

  def loss_and_grad(impl):
    objective = obj.Objective(model, scales, impl)

    def loss(p, b):
      ce = objective.all_scales_ce(p, b)
      return obj.m3_loss(ce, n, jnp.ones(len(scales)))[0], ce
    f = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params, batch).compile(compiler_options=FAST_COMPILE)
    return f(params, batch)

  (loss_loop, ce_loop), grad_loop = loss_and_grad("loop")
  (loss_packed, ce_packed), grad_packed = loss_and_grad("packed")
  assert np.all(np.asarray(ce_loop) > 0)
  np.testing.assert_allclose(np.asarray(ce_packed), np.asarray(ce_loop), rtol=2e-5)
  np.testing.assert_allclose(float(loss_packed), float(loss_loop), rtol=2e-5)
  flat_loop, flat_packed = jax.tree.leaves(grad_loop), jax.tree.leaves(grad_packed)
  assert len(flat_loop) == len(flat_packed)
  # Leaves whose gradient is float32 noise (~1e-10: biases feeding a LayerNorm) are compared at the scale of the
  # whole gradient.
  biggest = max(float(np.abs(a).max()) for a in flat_loop)
  assert biggest > 1e-3
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grad_loop), flat_packed):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6 * biggest,
                               err_msg=jax.tree_util.keystr(path))
