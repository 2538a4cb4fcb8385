"""Generation speed of the m3-jax engine against transformers, per scale, on the same random tiny / small models.

    python -m benchmarks.generate_speed [--configs tiny,small] [--batch 8] [--new-tokens 16] [--repeats 3]
                                        [--torch-threads auto|N[,M]] [--attn sdpa|eager]
                                        [--out benchmarks/generate_speed.md]

For each config a random float32 `LlavaForConditionalGeneration` with the config's dimensions (CLIPVisionConfig +
LlamaConfig + LlavaConfig, built from `convert.hf.hf_config`) is saved with `save_pretrained` and converted with
`m3 convert`'s API, so both sides run the same weights. One batch of B prompts (same length, the image placeholder
after BOS) with one random image each is decoded greedily for exactly `--new-tokens` tokens on both sides (m3-jax:
a stop id that is never generated; transformers: `min_new_tokens = max_new_tokens`).

What is timed, from pixels to generated ids (samples per second = B / median wall time):
  m3-jax        `Engine.visual_tokens(pixels, scale)` + `Engine.generate(...)` (jitted prefill + while_loop decode).
  transformers  full scale: `generate(input_ids, pixel_values)` with the placeholder expanded to the grid's tokens;
                pooled scales (transformers has no pooling): `get_image_features` -> 2-D average pooling ->
                `generate(inputs_embeds=...)`, the reference of tests/models/test_parity.py.
Warm-up (JAX compilation, torch's first call) is excluded; the two frameworks alternate within each repeat so a
change of machine load hits both. transformers runs with SDPA attention (`--attn eager` to change) and
`torch.set_num_threads(n)` for each n of `--torch-threads`; JAX runs on its default CPU client (all cores).

On an oversubscribed machine (load average above the core count) torch with one thread per core is 3-6x SLOWER than
with one thread (its OpenMP workers wait on each other at every op; XLA's pool degrades far less), so `auto` picks
1 thread there and all cores on a quiet machine: the baseline is transformers at its best, not at its worst. The
load average is printed before and after: absolute numbers move with it, the ratio less so.

MFU: model FLOPs per batch (`m3_jax.cost`: the prefill of the vision tower, projector and decoder over scale + 29 text
tokens with the last position's logits, then one decode step per further new token at its context, logits included;
no bucket padding counted) / median wall time / the float32 matmul peak measured in the same run by the same
framework (a jitted 2048^3 matmul in JAX; `torch.mm` at the thread count of the fastest transformers run). Runs on a
shared 2-core machine differed by up to 2x per cell (benchmarks/generate_speed.md holds one run; tiny is dominated
by per-call overhead, small by the ViT over 577 tokens and the prefill, where both sides run the same float32 GEMMs).
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import platform
import statistics
import tempfile
import time

import jax
import numpy as np

from m3_jax.checkpoint import m3dir
from m3_jax.configs import base as m3_config
from m3_jax.convert import hf as hf_map
from m3_jax.convert.convert import convert
from m3_jax.eval.generate import Engine, Sampling
from m3_jax.models.config import ModelConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPT_LEN = 30
NEVER = -1  # a stop id argmax can never produce: every run decodes exactly max_new_tokens


def build_pair(name: str, workdir: pathlib.Path, attn: str):
  """A random transformers LLaVA with config `name`'s dimensions, and its m3 conversion: (hf model, cfg, params)."""
  import torch
  import transformers as tf
  want = ModelConfig.from_config(m3_config.load(str(REPO / "configs" / f"{name}.py")).model)
  d = hf_map.hf_config(want)
  text = {k: v for k, v in d.pop("text_config").items() if k != "model_type"}
  vision = {k: v for k, v in d.pop("vision_config").items() if k != "model_type"}
  for k in ("model_type", "architectures"):
    d.pop(k)
  config = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**vision), text_config=tf.LlamaConfig(**text), **d)
  config._attn_implementation = attn
  torch.manual_seed(0)
  hf = tf.LlavaForConditionalGeneration(config).float().eval()
  src, out = workdir / f"{name}_hf", workdir / f"{name}_m3"
  hf.save_pretrained(src)
  convert(src, out, progress=False)
  cfg, params, _ = m3dir.load(out)
  # The conversion must give back the config's model, or the comparison is of two different models.
  for part in ("vision", "llm"):
    a, b = getattr(cfg, part), getattr(want, part)
    for f in ("width", "depth", "heads", "mlp_dim") + (("image_size", "patch_size") if part == "vision" else
                                                         ("vocab_size", "kv_heads")):
      if getattr(a, f) != getattr(b, f):
        raise RuntimeError(f"{name}: converted {part}.{f}={getattr(a, f)} but configs/{name}.py has {getattr(b, f)}")
  return hf, cfg, params


def make_inputs(cfg: ModelConfig, batch: int, seed: int = 0):
  """B prompts int32[PROMPT_LEN] (BOS, placeholder, random text ids) and CLIP-normalised pixels float32[B, H, W, 3]."""
  rng = np.random.default_rng(seed)
  special = {cfg.image_token_id, cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id}
  pool = np.array([t for t in range(5, min(cfg.llm.vocab_size, 32000)) if t not in special])
  prompts = [np.concatenate([[cfg.bos_token_id, cfg.image_token_id], rng.choice(pool, PROMPT_LEN - 2)]).astype(np.int32)
             for _ in range(batch)]
  s = cfg.vision.image_size
  pixels = rng.normal(size=(batch, s, s, 3)).astype(np.float32)
  return prompts, pixels


class JaxRunner:
  def __init__(self, cfg, params, new_tokens: int):
    self.engine = Engine(cfg, params, stop_ids=(NEVER,))
    self.sampling = Sampling(max_new_tokens=new_tokens)

  def __call__(self, prompts, pixels, scale: int) -> list[list[int]]:
    visual = self.engine.visual_tokens(pixels, scale, batch_size=len(pixels))
    return self.engine.generate(prompts, visual, self.sampling)


class TorchRunner:
  def __init__(self, hf, cfg: ModelConfig, new_tokens: int, threads: int):
    self.hf, self.cfg, self.new_tokens, self.threads = hf, cfg, new_tokens, threads
    self.gen = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id)

  def __call__(self, prompts, pixels, scale: int) -> list[list[int]]:
    import torch
    c, grid = self.cfg, self.cfg.vision.grid
    ids = torch.from_numpy(np.stack(prompts)).long()
    px = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    torch.set_num_threads(self.threads)
    with torch.inference_mode():
      if scale == grid * grid:
        # The processor's job: one placeholder -> the grid's image tokens.
        expanded = torch.stack([torch.cat([row[:1], torch.full((scale,), c.image_token_id), row[2:]]) for row in ids])
        out = self.hf.generate(input_ids=expanded, attention_mask=torch.ones_like(expanded), pixel_values=px,
                               **self.gen)
        out = out[:, expanded.shape[1]:]
      else:
        feats = self.hf.model.get_image_features(pixel_values=px, vision_feature_layer=c.vision.feature_layer,
                                                 vision_feature_select_strategy="default")
        feats = getattr(feats, "pooler_output", feats)
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        b, k = len(prompts), grid // math.isqrt(scale)
        pooled = torch.nn.functional.avg_pool2d(feats.reshape(b, grid, grid, -1).permute(0, 3, 1, 2), k)
        pooled = pooled.permute(0, 2, 3, 1).reshape(b, scale, -1)
        embed = self.hf.get_input_embeddings()
        x = torch.cat([embed(ids[:, :1]), pooled, embed(ids[:, 2:])], dim=1)
        out = self.hf.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long), **self.gen)
        out = out[:, -self.new_tokens:]  # with inputs_embeds only new tokens come back; keep the slice explicit
    return out.tolist()


def generation_flops(cfg: ModelConfig, scale: int, batch: int, new_tokens: int) -> int:
  """Model FLOPs of one benchmark batch: prefill (first new token from its logits) + new_tokens - 1 decode steps."""
  from m3_jax import cost
  pre = cost.prefill(cfg, scale, PROMPT_LEN - 1)   # the placeholder is not a text token
  decode = 0
  for k in range(1, new_tokens):
    f = cost.llm_flops(cfg.llm, 1, pre["sequence"] + k)
    decode += f["matmul"] + f["attention"] + cost.logits_flops(cfg.llm, 1)
  return batch * (pre["prefill_flops"]["total"] + decode)


def matmul_peak(framework: str, n: int = 2048, repeats: int = 5, threads: int = 1) -> float:
  """float32 FLOP/s of an n^3 matmul, best of `repeats`: jitted in JAX, `torch.mm` at `threads` threads."""
  if framework == "jax":
    import jax.numpy as jnp
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    run = lambda: f(a, a).block_until_ready()
  else:
    import torch
    torch.set_num_threads(threads)
    a = torch.randn(n, n)
    run = lambda: torch.mm(a, a)
  run()
  return 2 * n ** 3 / min(timed(run)[0] for _ in range(repeats))


def timed(fn, *args) -> tuple[float, float, object]:
  """(wall s, CPU s of this process summed over its threads, result)."""
  start, cpu = time.perf_counter(), time.process_time()
  result = fn(*args)
  return time.perf_counter() - start, time.process_time() - cpu, result


def bench_config(name: str, batch: int, new_tokens: int, repeats: int, attn: str, threads: list[int],
                 workdir: pathlib.Path, peaks: dict) -> list[dict]:
  t0 = time.perf_counter()
  hf, cfg, params = build_pair(name, workdir, attn)
  print(f"[{name}] built + converted in {time.perf_counter() - t0:.1f}s; scales {cfg.m3.scales}", flush=True)
  prompts, pixels = make_inputs(cfg, batch)
  runners = {"jax": JaxRunner(cfg, params, new_tokens)}
  runners.update({f"torch{n}": TorchRunner(hf, cfg, new_tokens, n) for n in threads})
  rows = []
  for scale in sorted(cfg.m3.scales, reverse=True):
    warm, outs, times, cpus = {}, {}, {k: [] for k in runners}, {k: [] for k in runners}
    for k, run in runners.items():
      warm[k], _, outs[k] = timed(run, prompts, pixels, scale)
    for _ in range(repeats):
      for k, run in runners.items():
        dt, cpu, _ = timed(run, prompts, pixels, scale)
        times[k].append(dt)
        cpus[k].append(cpu)
    assert all(len(o) == new_tokens for v in outs.values() for o in v), "a run stopped early"
    torch_keys = [k for k in runners if k != "jax"]
    same = np.mean(np.array(outs["jax"]) == np.array(outs[torch_keys[0]]))
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = {k: statistics.median(v) / batch for k, v in cpus.items()}
    best = min(torch_keys, key=med.get)  # the baseline: transformers at its faster thread count
    row = dict(config=name, scale=scale, full=scale == cfg.vision.grid ** 2, jax=batch / med["jax"],
               torch={n: batch / med[f"torch{n}"] for n in threads}, ratio=med[best] / med["jax"], same=same,
               compile=warm["jax"] - med["jax"], times=times,
               cpu_ratio=cpu[best] / cpu["jax"])
    flops = generation_flops(cfg, scale, batch, new_tokens)
    row.update(gflop=flops / 1e9, mfu_jax=flops / med["jax"] / peaks["jax"],
               mfu_torch=flops / med[best] / peaks[best])
    rows.append(row)
    per = "  ".join(f"transformers@{n}t {v:8.2f}/s" for n, v in row["torch"].items())
    print(f"[{name}] scale {scale:4d}: m3-jax {row['jax']:8.2f}/s  {per}  ratio vs best {row['ratio']:5.2f}x "
          f"(CPU-s {row['cpu_ratio']:.2f}x)  MFU m3-jax {row['mfu_jax']:.0%} transformers {row['mfu_torch']:.0%}  same tokens {same:.0%}  (jax warm-up {warm['jax']:.1f}s, "
          f"load {os.getloadavg()[0]:.1f})", flush=True)
  return rows


def table(rows: list[dict], threads: list[int]) -> str:
  head = " | ".join(f"transformers samples/s ({n} thread{'s' * (n > 1)})" for n in threads)
  lines = [f"| config | scale | transformers path | m3-jax samples/s | {head} | m3-jax / best transformers "
           "| same, per CPU-second | model GFLOP | MFU m3-jax | MFU transformers | same greedy tokens "
           "| m3-jax compile s |",
           "|---|---:|---|---:|" + "---:|" * len(threads) + "---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    path = "`generate(pixel_values)`" if r["full"] else "pooled `inputs_embeds`"
    per = " | ".join(f"{r['torch'][n]:.2f}" for n in threads)
    lines.append(f"| {r['config']} | {r['scale']} | {path} | {r['jax']:.2f} | {per} | "
                 f"**{r['ratio']:.2f}x** | {r['cpu_ratio']:.2f}x | {r['gflop']:.1f} | {r['mfu_jax']:.0%} | "
                 f"{r['mfu_torch']:.0%} | {r['same']:.0%} | {r['compile']:.1f} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--configs", default="tiny,small", help="comma-separated names under configs/")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--new-tokens", type=int, default=16)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--torch-threads", default="auto",
                 help="comma-separated torch thread counts, each timed (the ratio is against the fastest); 'auto': "
                      "all cores if the 1-min load average is below the core count, else 1 (an oversubscribed "
                      "machine makes torch's multi-threaded kernels several times slower, see the module doc)")
  p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="transformers attention implementation")
  p.add_argument("--out", default=str(REPO / "benchmarks" / "generate_speed.md"), help="'' to skip writing")
  args = p.parse_args(argv)

  import torch
  import transformers
  load_before = os.getloadavg()
  if args.torch_threads == "auto":
    threads = [os.cpu_count() if load_before[0] < os.cpu_count() else 1]
  else:
    threads = [int(n) for n in args.torch_threads.split(",")]
  print(f"cores {os.cpu_count()}, load average {load_before}", flush=True)
  peaks = {"jax": matmul_peak("jax")}
  peaks.update({f"torch{n}": matmul_peak("torch", threads=n) for n in threads})
  peak_line = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items())
  print(f"float32 2048^3 matmul peak: {peak_line}", flush=True)
  start = time.perf_counter()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.configs.split(","):
      rows += bench_config(name.strip(), args.batch, args.new_tokens, args.repeats, args.attn, threads,
                           pathlib.Path(tmp), peaks)
  load_after = os.getloadavg()
  total = time.perf_counter() - start

  cmd = (f"python -m benchmarks.generate_speed --configs {args.configs} --batch {args.batch} "
         f"--new-tokens {args.new_tokens} --repeats {args.repeats} --attn {args.attn} "
         f"--torch-threads {args.torch_threads}")
  chosen = f" (auto -> {threads[0]})" if args.torch_threads == "auto" else ""
  fmt = lambda la: ", ".join(f"{x:.2f}" for x in la)
  md = "\n".join([
      "# Generation speed: m3-jax engine vs transformers", "",
      f"`{cmd}`", "",
      f"Batch {args.batch} prompts of {PROMPT_LEN} tokens + one image each, greedy, exactly {args.new_tokens} new "
      f"tokens, float32, random weights (same weights on both sides via `m3 convert`). Samples/s = batch / median of "
      f"{args.repeats} timed runs (pixels -> generated ids), warm-up excluded. Ratio > 1: m3-jax is faster. "
      f"Per CPU-second: the same ratio in process CPU time (all threads), which a busy machine skews less.",
      f"Full scale: transformers `generate(input_ids, pixel_values)`; pooled scales: transformers "
      f"`get_image_features` -> avg-pool -> `generate(inputs_embeds=...)`. transformers attention: {args.attn}; "
      f"torch threads: {args.torch_threads}{chosen}.",
      "",
      table(rows, threads), "",
      f"float32 2048^3 matmul peak measured in this run (the MFU denominators): {peak_line}.", "",
      f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared), "
      f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, transformers "
      f"{transformers.__version__}. Load average (1, 5, 15 min) before: {fmt(load_before)}; after: "
      f"{fmt(load_after)}. Total wall time {total:.0f}s.", ""])
  print()
  print(md)
  if args.out:
    pathlib.Path(args.out).write_text(md)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
