"""The M3 objective against an independent reference: the model's full forward (vocabulary logits at every
position) with the next-token cross-entropy computed in numpy, per scale; `loop` and `vmap` must both match it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from m3_jax.models import llava
from m3_jax.train import objective as obj
from m3_jax.train.state import model_config_of

from train_testlib import FAST_COMPILE, batch_of, small_config


def compiled(f, *args):
  return jax.jit(f).lower(*args).compile(compiler_options=FAST_COMPILE)


def reference_ce(logits: np.ndarray, input_ids: np.ndarray, labels: np.ndarray, scale: int, image_token_id: int):
  """Summed next-token CE from full logits [B, T + scale - 1, V]. Text token t sits at expanded index t before the
  placeholder p and t + scale - 1 after it; its label is predicted by the expanded position just before it."""
  total = 0.0
  for row in range(input_ids.shape[0]):
    ph = np.flatnonzero(input_ids[row] == image_token_id)
    for t in np.flatnonzero(labels[row] != -100):
      if len(ph) and t == ph[0]:
        continue
      expanded = t if not len(ph) or t < ph[0] else t + scale - 1
      z = logits[row, expanded - 1].astype(np.float64)
      total += np.log(np.exp(z - z.max()).sum()) + z.max() - z[labels[row, t]]
  return total


def test_loop_and_vmap_match_full_logits_reference():
  config = small_config(**{"train.batch_size": 3, "train.scales": "(144, 36, 9, 1)"})
  mc = model_config_of(config)
  model = llava.LlavaM3(mc)
  params = llava.init_params(mc, jax.random.PRNGKey(1))
  batch = batch_of(config)
  # Row 2 is text-only: no placeholder, no image (LLaVA's mixed data has such rows).
  ids = batch["input_ids"].copy()
  ids[2, 1:-1], ids[2, -1] = ids[2, 2:], mc.pad_token_id
  labels = batch["labels"].copy()
  labels[2, 1:-1], labels[2, -1] = labels[2, 2:], -100
  mask = batch["attention_mask"].copy()
  mask[2, 1:-1], mask[2, -1] = mask[2, 2:], 0
  batch.update(input_ids=ids, labels=labels, attention_mask=mask)
  batch["has_image"][2] = False
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  scales = (144, 36, 9, 1)

  loop = obj.Objective(model, scales, "loop")
  vmap = obj.Objective(model, scales, "vmap")
  ce_loop = np.asarray(compiled(loop.all_scales_ce, params, batch)(params, batch))
  ce_vmap = np.asarray(compiled(vmap.all_scales_ce, params, batch)(params, batch))

  expected = []
  for s in scales:
    def forward(p, b, s=s):
      return model.apply({"params": p}, b["input_ids"], b["pixels"], scale=s, attention_mask=b["attention_mask"])
    logits = compiled(forward, params, batch)(params, batch)
    expected.append(reference_ce(np.asarray(logits), np.asarray(ids), np.asarray(labels), s, mc.image_token_id))
  expected = np.array(expected)
  np.testing.assert_allclose(ce_loop, expected, rtol=2e-5)
  # Only the labelled positions reach the logits: a budget of 2 per row (each row has 2 labels) is the same.
  budget = obj.label_budget(labels)
  assert budget == 8 and int((labels != -100).sum(1).max()) == 2
  tight = compiled(lambda p, b: loop.all_scales_ce(p, b, label_budget=2), params, batch)(params, batch)
  np.testing.assert_allclose(np.asarray(tight), expected, rtol=2e-5)
  np.testing.assert_allclose(ce_vmap, ce_loop, rtol=2e-5)

  # Eq. 3.2: the mean over scales of each scale's token-averaged CE; every scale has the same targets.
  n = sum(int((labels[r, 1:] != -100).sum()) for r in range(3))
  assert int(obj.count_targets(batch, mc.image_token_id)) == n
  loss, per_scale = obj.m3_loss(jnp.asarray(ce_loop), jnp.int32(n), jnp.ones(4))
  np.testing.assert_allclose(float(loss), np.mean(expected / n), rtol=2e-5)
  np.testing.assert_allclose(np.asarray(per_scale), expected / n, rtol=2e-5)

  # scale_sampling="random": one drawn scale, only its entry filled.
  one = np.asarray(compiled(loop.one_scale_ce, params, batch, jnp.int32(2))(params, batch, jnp.int32(2)))
  np.testing.assert_allclose(one, [0, 0, expected[2], 0], rtol=2e-5)


def test_gather_labelled_keeps_labelled_positions_in_order():
  hidden = jnp.arange(2 * 6, dtype=jnp.float32).reshape(2, 6, 1)
  targets = jnp.array([[-100, 7, -100, 8, -100, -100], [9, -100, -100, -100, -100, 10]])
  h, t = obj.gather_labelled(hidden, targets, 3)
  np.testing.assert_array_equal(np.asarray(t), [[7, 8, -100], [9, 10, -100]])
  np.testing.assert_array_equal(np.asarray(h)[..., 0][np.asarray(t) != -100], [1, 3, 6, 11])


def test_label_budget_is_chosen_or_checked_on_the_host():
  labels = np.full((2, 40), -100)
  labels[1, 2:7] = 5
  assert obj.label_budget(labels, 0) == 8               # next power of two >= 5, at least 8
  assert obj.label_budget(labels, 0, worst=9) == 16     # another host's rows need more
  labels[0, :33] = 1
  assert obj.label_budget(labels, 0) == 40              # never more than the text length
  assert obj.label_budget(labels[:, :36] * 0 - 100, 0) == 8
  assert obj.label_budget(labels[1:], 5) == 5           # fixed by train.max_label_tokens
  try:
    obj.label_budget(labels[1:], 4)
  except ValueError as e:
    assert "row 0 has 5 labelled tokens" in str(e) and "train.max_label_tokens" in str(e)
  else:
    raise AssertionError("a row over the label budget must be an error")
