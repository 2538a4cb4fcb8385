"""Where a train step's time goes: the step's parts, each jitted and timed alone, beside XLA's own count.

    python -m benchmarks.profile_train_step [--config small] [--batch 4] [--text-tokens 32] [--repeats 3]
                                            [--config.KEY=VALUE ...]

Parts (forward + backward, the gradient of a scalar of the part's output with respect to its parameters and
inputs, on the same shapes as `benchmarks.train_step`): the vision tower + projector on the batch's images; the
decoder over T + S tokens at each scale (with its logits at the label budget); AdamW on every parameter. For each:
median seconds, analytic model GFLOP (`m3_jax.cost`), GFLOP/s and the share of the summed parts; then XLA's
`cost_analysis()` FLOPs of each compiled part beside the analytic count, and the matmul peak measured in the run.
The parts' sum against the full step's time (`benchmarks.train_step`) shows what the fused step adds or saves.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def main(argv=None):
  from m3_jax.configs.overrides import split_overrides
  overrides, rest = split_overrides(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="small")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--text-tokens", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(rest)

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from benchmarks.train_step import jax_matmul_peak, load_config
  from m3_jax import cost
  from m3_jax.models import llava
  from m3_jax.train.state import model_config_of
  config = load_config(args.config, overrides, args.batch, args.text_tokens)
  cfg = model_config_of(config)
  model = llava.LlavaM3(cfg)
  ids, px = llava.dummy_inputs(cfg)
  params = nn.unbox(jax.jit(lambda r: model.init(r, ids, px, cfg.full_scale))(jax.random.PRNGKey(0))["params"])
  b, t, d = args.batch, args.text_tokens - 1, cfg.llm.width
  budget = 8
  rng = np.random.default_rng(0)
  pixels = jnp.asarray(rng.normal(size=(b, cfg.vision.image_size, cfg.vision.image_size, 3)), jnp.float32)

  def vision_loss(p, pixels):
    return jnp.sum(model.apply({"params": p}, pixels, method=model.encode) ** 2)

  def decoder_loss(p, x, pos, mask):
    hidden, _ = model.apply({"params": p}, x, pos, mask, method=model.decode)
    logits = model.apply({"params": p}, hidden[:, -budget:], method=model.logits)
    return jnp.sum(jax.nn.logsumexp(logits, -1))

  opt = optax.adamw(1e-4)
  opt_state = opt.init(params)
  parts = {"vision+projector": (jax.jit(jax.grad(vision_loss, argnums=(0, 1))), (params, pixels),
                                3 * (sum(cost.vision_flops(cfg.vision).values()) + cost.projector_flops(cfg, 576)) * b)}
  for s in cfg.m3.scales:
    n = t + s
    x = jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    mask = jnp.ones((b, n), bool)
    f = cost.llm_flops(cfg.llm, n)
    parts[f"decoder @ {s} ({n} tokens)"] = (jax.jit(jax.grad(decoder_loss, argnums=(0, 1))), (params, x, pos, mask),
                                            3 * b * (f["matmul"] + f["attention"] + cost.logits_flops(cfg.llm, budget)))
  parts["AdamW update"] = (jax.jit(lambda g, s, p: opt.update(g, s, p)), (params, opt_state, params), 0)

  peak = jax_matmul_peak()
  rows = []
  for name, (fn, a, flops) in parts.items():
    start = time.perf_counter()
    compiled = fn.lower(*a).compile()
    compile_s = time.perf_counter() - start
    xla = (compiled.cost_analysis() or {})
    xla = xla[0] if isinstance(xla, list) else xla
    jax.block_until_ready(compiled(*a))
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*a))
      times.append(time.perf_counter() - start)
    rows.append((name, statistics.median(times), flops, float(xla.get("flops", 0)), compile_s))
    print(f"# {name}: {rows[-1][1]:.3f}s, compile {compile_s:.1f}s", flush=True)
  total = sum(r[1] for r in rows)
  print(f"\nParts of a train step on {args.config}, batch {b}, {args.text_tokens} text tokens, float32; float32 "
        f"2048^3 matmul peak {peak / 1e9:.1f} GFLOP/s; load average {open('/proc/loadavg').read().split()[:3]}\n")
  print("| part | s | share | model GFLOP | XLA GFLOP | GFLOP/s | of peak | compile s |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for name, sec, flops, xla, compile_s in rows:
    print(f"| {name} | {sec:.3f} | {sec / total:.0%} | {flops / 1e9:.1f} | {xla / 1e9:.1f} | {flops / sec / 1e9:.1f} | "
          f"{flops / sec / peak:.0%} | {compile_s:.1f} |")
  print(f"| sum of parts | {total:.3f} | | {sum(r[2] for r in rows) / 1e9:.1f} | | "
        f"{sum(r[2] for r in rows) / total / 1e9:.1f} | {sum(r[2] for r in rows) / total / peak:.0%} | |")


if __name__ == "__main__":
  main()
