"""The train state and the train step: a pure, sharded, ahead-of-time compiled function of (state, batch).

    state = {"step": int32[], "params": float32 tree, "opt_state": optax state of the trainable parts,
             "rng": uint32[2]}
    train_step(state, batch) -> (state, metrics)      # pure; jitted with explicit shardings, state donated

The step differentiates only the trainable parts (optim.split), accumulates `train.grad_accum` micro-batches with
`lax.scan`, clips, applies AdamW, and keeps the previous params and optimiser state when the loss or the gradient
norm is not finite (so no poisoned state can reach a checkpoint); the loop (train/loop.py) reports such a step.
Which scales a step trains is the curriculum's (train/curriculum.py).
"""
from __future__ import annotations

import logging
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from m3_jax import sharding as shd
from m3_jax.checkpoint import m3dir
from m3_jax.models import llava
from m3_jax.models.config import ModelConfig
from m3_jax.train import objective as obj
from m3_jax.train import optim
from m3_jax.train import curriculum
from m3_jax.train.curriculum import Curriculum

log = logging.getLogger(__name__)
BATCH_NDIM = {"input_ids": 2, "labels": 2, "attention_mask": 2, "pixels": 4, "has_image": 1}
BATCH_KEYS = tuple(BATCH_NDIM)


def batch_ndim(model_config: ModelConfig, scales) -> dict[str, int]:
  """The train batch's keys and ranks: LLaVA-1.5's, or LLaVA-NeXT's crops float32[B, C, S, S, 3] and a packing
  plan per trained scale (objective.index_key)."""
  if model_config.type != "llava_next":
    return dict(BATCH_NDIM)
  return {**BATCH_NDIM, "pixels": 5, **{obj.index_key(s): 2 for s in scales}}


def model_config_of(config: ml_collections.ConfigDict) -> ModelConfig:
  """The model config with the run's compute choices (`train.dtype`, `train.remat`) applied."""
  mc = ModelConfig.from_config(config.model)
  return mc.replace(dtype=str(config.train.get("dtype", mc.dtype)), remat=str(config.train.get("remat", mc.remat)))


class TrainStep:
  """The model, mesh, optimiser, train state and the compiled step for `config` (train/loop.py `fit` drives it)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None,
               compiler_options: dict | None = None):
    self.config = config
    # XLA options for the AOT compile, e.g. {"xla_backend_optimization_level": 0} halves CPU compile time in tests.
    self.compiler_options = dict(compiler_options or {})
    train = config.train
    self.model_config = model_config_of(config)
    self.model = llava.LlavaM3(self.model_config)
    self.scales = obj.scales_of(self.model_config.m3.scales, train.get("scales", ()))
    self.objective = obj.Objective(self.model, self.scales, impl=str(train.scale_loss),
                                   max_label_tokens=int(train.get("max_label_tokens", 0)))
    self.curriculum = Curriculum.of(train, self.scales)
    self.freeze = optim.check_freeze(train.freeze)
    self.grad_accum = int(train.grad_accum)
    if self.grad_accum < 1:
      raise ValueError(f"train.grad_accum={self.grad_accum} must be >= 1")
    curriculum.check_groups(self.curriculum.sampling, int(train.batch_size) // self.grad_accum, len(self.scales))
    self.batch_ndim = batch_ndim(self.model_config, self.scales)

    self.mesh = mesh or shd.make_mesh(config.mesh.shape)
    self.rules = rules = shd.rules_of(config.mesh.rules)
    boxed = llava.abstract_params(self.model_config)
    self.param_shardings = shd.logical_shardings(boxed, self.mesh, rules)
    self.abstract_params = nn.unbox(boxed)
    trainable, _ = optim.split(self.abstract_params, self.freeze)
    self.optimizer = optim.make_optimizer(train, trainable)
    abstract_opt = jax.eval_shape(self.optimizer.init, trainable)
    trainable_sh, _ = optim.split(self.param_shardings, self.freeze)
    repl = shd.replicated(self.mesh)
    self.state_shardings = {"step": repl, "params": self.param_shardings,
                            "opt_state": shd.opt_state_shardings(abstract_opt, trainable_sh, self.mesh),
                            "rng": repl}
    self._compiled: dict[Any, Any] = {}
    self._init = None
    batch_sh = {k: shd.batch_sharding(self.mesh, n, rules) for k, n in self.batch_ndim.items()}
    self._jitted = jax.jit(self.train_step, in_shardings=(self.state_shardings, batch_sh),
                           out_shardings=(self.state_shardings, repl), donate_argnums=0, static_argnums=2)

  # ---- state ----------------------------------------------------------------------------------------------------
  def abstract_state(self) -> dict:
    """ShapeDtypeStructs (with shardings) of the train state: the restore target."""
    def abstract(x, s):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    shapes = jax.eval_shape(self._fresh_state, jax.random.PRNGKey(0))
    return jax.tree_util.tree_map(abstract, shapes, self.state_shardings)

  def _fresh_state(self, rng) -> dict:
    init_rng, state_rng = jax.random.split(rng)
    ids, pixels = llava.dummy_inputs(self.model_config)
    params = nn.unbox(self.model.init(init_rng, ids, pixels, self.model_config.full_scale)["params"])
    return self._state_from_params(params, state_rng)

  def _state_from_params(self, params, rng) -> dict:
    trainable, _ = optim.split(params, self.freeze)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.optimizer.init(trainable),
            "rng": rng}

  def init_state(self, seed: int | None = None) -> dict:
    """A fresh state, created directly in its shards (never whole on one device); with `checkpoint.init_from`
    the params come from that m3 checkpoint directory."""
    seed = int(self.config.train.seed if seed is None else seed)
    rng = jax.random.PRNGKey(seed)
    init_from = str(self.config.checkpoint.get("init_from", "") or "")
    if not init_from:
      if self._init is None:
        self._init = jax.jit(self._fresh_state, out_shardings=self.state_shardings).lower(rng).compile(
            compiler_options=self.compiler_options or None)
      return self._init(rng)
    m3dir.check_init_from(init_from, self.model_config)
    params = m3dir.load_params(init_from, target_shardings=self.param_shardings, abstract=self.abstract_params)
    log.info("initialised params from %s", init_from)
    state_rng = jax.random.split(rng)[1]
    return jax.jit(self._state_from_params, out_shardings=self.state_shardings)(params, state_rng)

  # ---- the step -------------------------------------------------------------------------------------------------
  def loss_and_grads(self, params: dict, batch: dict, rng=None, label_budget: int | None = None, step=None
                     ) -> tuple[jax.Array, dict, dict]:
    """(loss, aux, grads of the trainable parts) for one global batch; aux holds per-scale CE and counts.
    `label_budget` (static, see objective.label_budget): labelled positions per row that reach the logits.
    `step` (traced) switches from the finest scale alone to the M3 objective at `train.finest_first_steps`."""
    trainable, frozen = optim.split(params, self.freeze)
    num_targets = obj.count_targets(batch, self.model_config.image_token_id)
    m = len(self.scales)
    index, finest_only, trained = self.curriculum.trained(step, rng)
    finest = self.curriculum.finest

    per_sample = self.curriculum.sampling == "random_per_sample"
    group_rng = jax.random.PRNGKey(0) if rng is None else rng

    def loss_fn(trainable, micro, micro_rng=group_rng):
      p = optim.merge(trainable, frozen)
      with shd.activation_layout(self.mesh, self.rules):  # the blocks pin their activations (sharding.constrain)
        if per_sample:  # one scale per row: M groups of B/M rows, each decoded at its scale only
          groups = curriculum.groups(micro_rng, micro["input_ids"].shape[0], m)
          ce = self.objective.per_sample_ce(p, micro, groups, label_budget)
        elif index is not None:
          ce = self.objective.one_scale_ce(p, micro, index, label_budget)
        elif finest_only is not None:  # lax.cond runs only the branch taken: the finest phase costs one decoder pass
          ce = jax.lax.cond(finest_only,
                            lambda: self.objective.one_scale_ce(p, micro, jnp.int32(finest), label_budget),
                            lambda: self.objective.all_scales_ce(p, micro, label_budget))
        else:
          ce = self.objective.all_scales_ce(p, micro, label_budget)
      loss, _ = obj.m3_loss(ce, num_targets, trained)
      return loss, ce

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if self.grad_accum == 1:
      (loss, ce), grads = grad_fn(trainable, batch)
    else:
      micro = jax.tree_util.tree_map(self._micro_batches, batch)

      def body(acc, xs):
        mb, micro_rng = xs
        mb = {k: jax.lax.with_sharding_constraint(v, shd.batch_sharding(self.mesh, v.ndim, self.rules))
              for k, v in mb.items()}
        (l, c), g = grad_fn(trainable, mb, micro_rng)
        return jax.tree_util.tree_map(jnp.add, acc, (l, c, g)), None

      zeros = (jnp.zeros(()), jnp.zeros((m,)), jax.tree_util.tree_map(jnp.zeros_like, trainable))
      (loss, ce, grads), _ = jax.lax.scan(body, zeros, (micro, jax.random.split(group_rng, self.grad_accum)))
    _, per_scale = obj.m3_loss(ce, num_targets, trained)
    return loss, {"per_scale": per_scale, "trained": trained, "num_targets": num_targets}, grads

  def _micro_batches(self, x: jax.Array) -> jax.Array:
    """[k*b, ...] -> [k, b, ...] with micro-batch j = rows j, k+j, 2k+j, ...: every device's contiguous block of
    rows feeds every micro-batch, so no rows move between devices."""
    k = self.grad_accum
    if x.shape[0] % k:
      raise ValueError(f"batch size {x.shape[0]} is not a multiple of train.grad_accum={k}")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

  def train_step(self, state: dict, batch: dict, label_budget: int | None = None) -> tuple[dict, dict]:
    rng = jax.random.fold_in(state["rng"], state["step"])
    loss, aux, grads = self.loss_and_grads(state["params"], batch, rng, label_budget, state["step"])
    trainable, frozen = optim.split(state["params"], self.freeze)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = self.optimizer.update(grads, state["opt_state"], trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def keep_if_finite(new, old):
      # A skipped step keeps params and moments but counts (integer leaves), as the step and the curriculum do: the
      # LR schedule (an optax count) stays at schedule(step), the value logged as lr/<part>.
      return jax.tree_util.tree_map(
          lambda a, b: a if jnp.issubdtype(a.dtype, jnp.integer) else jnp.where(finite, a, b), new, old)

    new_state = {"step": state["step"] + 1,
                 "params": optim.merge(keep_if_finite(new_trainable, trainable), frozen),
                 "opt_state": keep_if_finite(opt_state, state["opt_state"]),
                 "rng": state["rng"]}
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **aux,
               **optim.learning_rates(self.config.train, state["step"], self.freeze)}
    return new_state, metrics

  def batch_shardings(self, batch: dict) -> dict:
    return {k: shd.batch_sharding(self.mesh, np.ndim(v), self.rules) for k, v in batch.items()}

  def compiled_step(self, batch: dict, label_budget: int | None = None):
    """The step compiled ahead of time for `batch`'s shapes and the label budget (cached per pair); logs XLA's
    memory analysis."""
    key = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items())) + (label_budget,)
    if key not in self._compiled:
      abstract_batch = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=s)
                        for (k, v), s in zip(batch.items(), self.batch_shardings(batch).values())}
      start = time.perf_counter()
      lowered = self._jitted.lower(self.abstract_state(), abstract_batch, label_budget)
      compiled = lowered.compile(compiler_options=self.compiler_options or None)
      log.info("compiled the train step for %s, %s labelled positions per row, in %.1fs; %s",
               dict((k, s) for k, s, _ in key[:-1]), label_budget or "all",
               time.perf_counter() - start, memory_summary(compiled))
      self._compiled[key] = compiled
    return self._compiled[key]


def memory_summary(compiled) -> str:
  """XLA's memory analysis of a compiled executable, per device, in MiB."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 -- some backends have none
    return "memory analysis unavailable"
  if ma is None:
    return "memory analysis unavailable"
  mib = 1 << 20
  return (f"per-device memory: arguments {ma.argument_size_in_bytes / mib:.1f} MiB, outputs "
          f"{ma.output_size_in_bytes / mib:.1f} MiB, temporaries {ma.temp_size_in_bytes / mib:.1f} MiB, "
          f"aliased {ma.alias_size_in_bytes / mib:.1f} MiB")
