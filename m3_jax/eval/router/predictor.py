"""The router's predictor: a one-hidden-layer MLP from features float[N, F] to P(scale answers) float[N, S],
trained with optax (AdamW on the cross-entropy with the per-scale targets in [0, 1]: exact-match labels or soft
scores), full batch, in seconds on a CPU. Features are standardised with the training set's mean and std, which
are kept with the weights."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

HIDDEN = 32
STEPS = 400
LR = 1e-2
WEIGHT_DECAY = 1e-2


def _logits(params: dict, x: jnp.ndarray) -> jnp.ndarray:
  h = jnp.tanh(((x - params["mean"]) / params["std"]) @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def fit(x: np.ndarray, y: np.ndarray, *, hidden: int = HIDDEN, steps: int = STEPS, seed: int = 0) -> dict:
  """x float[N, F], y float[N, S] targets in [0, 1] -> params {mean, std, w1, b1, w2, b2} (numpy float32)."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  n_in, n_out = x.shape[1], y.shape[1]
  k1, k2 = jax.random.split(jax.random.key(seed))
  fixed = {"mean": x.mean(0), "std": x.std(0) + 1e-6}
  train = {"w1": jax.random.normal(k1, (n_in, hidden)) / np.sqrt(n_in), "b1": jnp.zeros(hidden),
           "w2": jax.random.normal(k2, (hidden, n_out)) / np.sqrt(hidden), "b2": jnp.zeros(n_out)}
  opt = optax.adamw(LR, weight_decay=WEIGHT_DECAY)

  def loss(p):
    return optax.sigmoid_binary_cross_entropy(_logits({**fixed, **p}, x), y).mean()

  def step(carry, _):
    p, state = carry
    grads = jax.grad(loss)(p)
    updates, state = opt.update(grads, state, p)
    return (optax.apply_updates(p, updates), state), None

  (train, _), _ = jax.lax.scan(step, (train, opt.init(train)), None, length=steps)
  return {k: np.asarray(v, np.float32) for k, v in {**fixed, **train}.items()}


def predict(params: dict, x: np.ndarray) -> np.ndarray:
  """float[N, F] -> P(scale answers) float64[N, S], in numpy float64: a row's probabilities do not depend on the
  rows beside it (to far below the thresholds' 0.01 grid), and no compilation."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  h = np.tanh(((np.asarray(x, np.float64) - p["mean"]) / p["std"]) @ p["w1"] + p["b1"])
  return 1.0 / (1.0 + np.exp(-(h @ p["w2"] + p["b2"])))
