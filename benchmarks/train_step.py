"""One M3 train step (every scale, forward + backward + AdamW) side by side: PyTorch as the official M3 code does it,
PyTorch with the encoder run once, and m3-jax; seconds per step, ratios, model FLOPs and MFU, in one process run.

    python -m benchmarks.train_step [--config small] [--batch 4] [--text-tokens 32] [--steps 3]
                                    [--impls official,once,loop,vmap] [--torch-threads auto|N]
                                    [--config.KEY=VALUE ...] [--dry-run]

The same sizes (the config's model), batch, padded text length, labels (synthetic batches: BOS, placeholder,
prompt, answer, EOS; answer and EOS labelled) and all of the config's scales per step, float32, one device:
  official  PyTorch + transformers as the official M3 code trains (its llava_arch.py): for each scale, CLIP and the
            projector run again, the pooled tokens are spliced into inputs_embeds and `LlavaForConditionalGeneration`
            runs forward with labels (logits at every position) and backward; gradients accumulate over scales.
  once      PyTorch + transformers, m3-jax's algorithm: CLIP + projector once, every scale avg-pooled from that output,
            the decoder once per scale at its own length, logits only at the labelled positions (the label budget P).
  loop      m3-jax `train.scale_loss=loop` (the same algorithm, one XLA program); vmap: every scale padded to 576;
            packed: the coarse scales in one decoder pass (model FLOPs counted as loop's: the masked-out attention
            between segments is not model work).
All sides finish with AdamW (and m3-jax's grad clipping). Each timed round runs every side once, in turn
(A, B, C, D, A, B, ...), so a change of machine load hits all; the medians are printed, with the load average.

Model FLOPs per step are analytic (`m3_jax.cost.train_step_flops` for m3-jax; for PyTorch the same formulas over
what it runs: every CLIP layer, as transformers' vision tower returns all hidden states, per scale for `official`,
and logits at every position there). MFU = model FLOPs / step time / the float32 matmul peak of this machine,
measured in the same run by the same framework (a jitted 2048^3 matmul in JAX, `torch.mm` in torch).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
IMPLS = ("official", "once", "loop", "vmap", "packed")


# ---------------------------------------------------------------------------------------------------- peaks
def jax_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """float32 FLOP/s of a jitted n^3 matmul (best of `repeats`)."""
  import jax
  import jax.numpy as jnp
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = min(_time(lambda: f(a, a).block_until_ready()) for _ in range(repeats))
  return 2 * n ** 3 / best


def torch_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  import torch
  a = torch.randn(n, n)
  torch.mm(a, a)
  best = min(_time(lambda: torch.mm(a, a)) for _ in range(repeats))
  return 2 * n ** 3 / best


def _time(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------- FLOPs
def torch_step_flops(cfg, *, batch: int, text_tokens: int, label_positions: int, official: bool) -> int:
  """Model FLOPs of the PyTorch steps: forward + 2x backward of everything trained, over what they run.

  transformers' CLIP runs every layer (hidden_states of all of them; the last one gets no gradient), so the
  vision forward counts `depth` layers, its backward `layers_used`. official: CLIP + projector per scale, logits
  at all T + S positions; once: CLIP + projector once, logits at `label_positions` per row."""
  import dataclasses

  from m3_jax import cost
  full = dataclasses.replace(cfg.vision, feature_layer=cfg.vision.depth)   # every layer
  vision_fwd = sum(cost.vision_flops(full).values())
  vision_bwd = 2 * sum(cost.vision_flops(cfg.vision).values())
  projector = cost.projector_flops(cfg, cfg.full_scale)
  encoder = vision_fwd + vision_bwd + 3 * projector
  total = 0
  for s in cfg.m3.scales:
    f = cost.llm_flops(cfg.llm, text_tokens + s)
    positions = text_tokens + s if official else label_positions
    total += 3 * (f["matmul"] + f["attention"] + cost.logits_flops(cfg.llm, positions))
    if official:
      total += encoder
  return batch * (total + (0 if official else encoder))


# ---------------------------------------------------------------------------------------------------- PyTorch
class TorchStep:
  """A random float32 `LlavaForConditionalGeneration` with the config's sizes and one train step of it."""

  def __init__(self, cfg, official: bool, threads: int, seed: int = 0):
    import torch
    import transformers as tf

    from m3_jax.convert import hf as hf_map
    d = hf_map.hf_config(cfg)
    text = {k: v for k, v in d.pop("text_config").items() if k != "model_type"}
    vision = {k: v for k, v in d.pop("vision_config").items() if k != "model_type"}
    for k in ("model_type", "architectures"):
      d.pop(k)
    config = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**vision), text_config=tf.LlamaConfig(**text), **d)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    self.model = tf.LlavaForConditionalGeneration(config).float().train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
    self.cfg, self.official, self.threads = cfg, official, threads

  def _pooled(self, feats, scale: int):
    """float[B, N, D] projector output -> float[B, scale, D], LLaVA-M3's 2-D average pooling."""
    import torch
    b, n, d = feats.shape
    grid = int(round(n ** 0.5))
    k = grid // int(round(scale ** 0.5))
    x = feats.reshape(b, grid, grid, d).permute(0, 3, 1, 2)
    return torch.nn.functional.avg_pool2d(x, k).permute(0, 2, 3, 1).reshape(b, scale, d)

  def _features(self, px):
    import torch
    out = self.model.model.get_image_features(pixel_values=px, vision_feature_layer=self.cfg.vision.feature_layer,
                                              vision_feature_select_strategy="default")
    out = getattr(out, "pooler_output", out)
    return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out

  def _splice(self, ids, mask, labels, img):
    """Expand the placeholder (column 1 of every synthetic row) into the image's tokens."""
    import torch
    from m3_jax.labels import IGNORE
    b, s = img.shape[:2]
    emb = self.model.get_input_embeddings()
    x = torch.cat([emb(ids[:, :1]), img, emb(ids[:, 2:])], dim=1)
    m = torch.cat([mask[:, :1], torch.ones(b, s, dtype=mask.dtype), mask[:, 2:]], dim=1)
    lab = torch.cat([labels[:, :1], torch.full((b, s), IGNORE, dtype=labels.dtype), labels[:, 2:]], dim=1)
    return x, m, lab

  def __call__(self, host: dict, budget: int) -> float:
    import torch
    from m3_jax.labels import IGNORE
    torch.set_num_threads(self.threads)
    ids, mask, labels = (torch.from_numpy(host[k]).long() for k in ("input_ids", "attention_mask", "labels"))
    px = torch.from_numpy(host["pixels"].transpose(0, 3, 1, 2).copy())
    scales = self.cfg.m3.scales
    self.opt.zero_grad(set_to_none=True)
    total = 0.0
    if self.official:
      for s in scales:   # llava_arch.py: encode_images and the LLM again at every scale
        x, m, lab = self._splice(ids, mask, labels, self._pooled(self._features(px), s))
        loss = self.model(inputs_embeds=x, attention_mask=m, labels=lab).loss / len(scales)
        loss.backward()
        total += float(loss.detach())
    else:
      feats = self._features(px)
      n_targets = max(int((labels[:, 1:] != IGNORE).sum()), 1)
      losses = []
      for s in scales:
        x, m, lab = self._splice(ids, mask, labels, self._pooled(feats, s))
        hidden = self.model.model.language_model(inputs_embeds=x, attention_mask=m).last_hidden_state
        targets = torch.cat([lab[:, 1:], torch.full_like(lab[:, :1], IGNORE)], dim=1)
        order = torch.argsort((targets == IGNORE).int(), dim=1, stable=True)[:, :budget]
        t = torch.gather(targets, 1, order)
        h = torch.gather(hidden, 1, order[:, :, None].expand(-1, -1, hidden.shape[-1]))
        logits = self.model.lm_head(h).float()
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1),
                                               ignore_index=IGNORE, reduction="sum")
        losses.append(ce / n_targets)
      loss = torch.stack(losses).mean()
      loss.backward()
      total = float(loss.detach())
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    return total


# ---------------------------------------------------------------------------------------------------- m3-jax
class JaxStep:
  """m3-jax's compiled train step (`m3_jax.train.state.TrainStep`) with `train.scale_loss=impl`."""

  def __init__(self, config, impl: str, host: dict, budget: int):
    import jax

    from m3_jax import sharding as shd
    from m3_jax.train.state import TrainStep
    config = config.copy_and_resolve_references()
    config.train.scale_loss = impl
    self.trainer = TrainStep(config, mesh=shd.make_mesh((1, 1, 1), jax.devices()[:1]))
    self.state = self.trainer.init_state()
    start = time.perf_counter()
    self.step = self.trainer.compiled_step(shd.shard_batch(host, self.trainer.mesh), budget)
    self.compile_s = time.perf_counter() - start
    self.temp_mib = self.step.memory_analysis().temp_size_in_bytes / 2 ** 20

  def __call__(self, host: dict, budget: int) -> float:
    import jax

    from m3_jax import sharding as shd
    self.state, metrics = self.step(self.state, shd.shard_batch(host, self.trainer.mesh))
    return float(jax.block_until_ready(metrics["loss"]))


# ---------------------------------------------------------------------------------------------------- main
def no_stray_placeholders(batch: dict, image_token_id: int, word: int = 16) -> dict:
  """A random prompt id equal to the image placeholder would be a second image: make it an ordinary word (the
  PyTorch steps splice the image at column 1, where the synthetic rows put it)."""
  ids = batch["input_ids"].copy()
  ids[:, 2:][ids[:, 2:] == image_token_id] = word
  return {**batch, "input_ids": ids}


def load_config(spec: str, overrides: list[str], batch: int, text_tokens: int):
  from m3_jax.configs import base as m3_config
  config = m3_config.load(spec, [f"data.max_length={text_tokens}", f"train.batch_size={batch}",
                                 "data.source='synthetic'", "mesh.shape=(1, 1, 1)", *overrides])
  return config


def main(argv=None):
  from m3_jax.configs.overrides import split_overrides
  overrides, rest = split_overrides(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="small", help="a config name (tiny, small) or file")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--text-tokens", type=int, default=32, help="padded text length per row, placeholder included")
  p.add_argument("--steps", type=int, default=3, help="timed rounds (each runs every implementation once)")
  p.add_argument("--impls", default="official,once,loop", help=f"comma list of {', '.join(IMPLS)}")
  p.add_argument("--torch-threads", default="auto",
                 help="'auto': all cores if the 1-min load average is below the core count, else 1")
  p.add_argument("--dry-run", action="store_true", help="print the plan and the FLOP counts, run nothing")
  args = p.parse_args(rest)
  impls = [i.strip() for i in args.impls.split(",") if i.strip()]
  bad = sorted(set(impls) - set(IMPLS))
  if bad:
    p.error(f"--impls: {bad} unknown; expected any of {', '.join(IMPLS)}")

  from m3_jax import cost
  from m3_jax.data.synthetic import SyntheticBatches
  from m3_jax.train import objective as obj
  from m3_jax.train.state import model_config_of
  config = load_config(args.config, overrides, args.batch, args.text_tokens)
  cfg = model_config_of(config)
  load_before = os.getloadavg()
  threads = (os.cpu_count() if load_before[0] < os.cpu_count() else 1) if args.torch_threads == "auto" \
      else int(args.torch_threads)
  data = SyntheticBatches(batch_size=args.batch, seq_len=args.text_tokens, image_size=cfg.vision.image_size,
                          vocab_size=cfg.llm.vocab_size, image_token_id=cfg.image_token_id,
                          bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                          process_index=0, process_count=1)
  host = [no_stray_placeholders(data.global_batch(i), cfg.image_token_id) for i in range(args.steps + 1)]
  budget = obj.label_budget(host[0]["labels"])
  text = args.text_tokens - 1   # the placeholder is not a text token
  flops = {i: (torch_step_flops(cfg, batch=args.batch, text_tokens=text, label_positions=budget,
                                official=i == "official") if i in ("official", "once") else
               cost.train_step_flops(cfg, batch=args.batch, text_tokens=text, label_positions=budget,
                                    impl="vmap" if i == "vmap" else "loop"))
           for i in impls}
  print(f"config {args.config} (vision {cfg.vision.width}x{cfg.vision.depth} on {cfg.vision.image_size}px, llm "
        f"{cfg.llm.width}x{cfg.llm.depth}, vocab {cfg.llm.vocab_size}), batch {args.batch}, {args.text_tokens} text "
        f"tokens, scales {cfg.m3.scales}, label budget {budget}; torch threads {threads}; cores {os.cpu_count()}, "
        f"/proc/loadavg {pathlib.Path('/proc/loadavg').read_text().strip()}", flush=True)
  for i in impls:
    print(f"  {i}: {flops[i] / 1e9:.1f} model GFLOP per step", flush=True)
  if args.dry_run:
    return

  import torch
  peaks = {"jax": jax_matmul_peak()}
  torch.set_num_threads(threads)
  peaks["torch"] = torch_matmul_peak()
  print(f"float32 2048^3 matmul peak: JAX {peaks['jax'] / 1e9:.1f} GFLOP/s, torch ({threads} threads) "
        f"{peaks['torch'] / 1e9:.1f} GFLOP/s", flush=True)
  runners, warm = {}, {}
  for i in impls:
    start = time.perf_counter()
    runners[i] = (TorchStep(cfg, i == "official", threads) if i in ("official", "once")
                  else JaxStep(config, i, host[0], budget))
    runners[i](host[0], budget)   # warm-up (and for JAX the first call after the AOT compile)
    warm[i] = time.perf_counter() - start
    print(f"  {i}: built + compiled + warm-up step {warm[i]:.1f}s", flush=True)
  times = {i: [] for i in impls}
  losses = {i: [] for i in impls}
  for r in range(args.steps):
    for i in impls:
      start = time.perf_counter()
      losses[i].append(runners[i](host[r + 1], budget))
      times[i].append(time.perf_counter() - start)
    print(f"  round {r}: " + ", ".join(f"{i} {times[i][-1]:.2f}s" for i in impls)
          + f" (load {os.getloadavg()[0]:.1f})", flush=True)
  load_after = pathlib.Path("/proc/loadavg").read_text().strip()

  med = {i: statistics.median(times[i]) for i in impls}
  framework = {i: "torch" if i in ("official", "once") else "jax" for i in impls}
  cmd = (f"python -m benchmarks.train_step --config {args.config} --batch {args.batch} --text-tokens "
         f"{args.text_tokens} --steps {args.steps} --impls {args.impls} --torch-threads {args.torch_threads}"
         + "".join(f" --config.{o}" for o in overrides))
  print(f"\nTrain step, `{cmd}`: {cfg.vision.width}x{cfg.vision.depth} ViT + {cfg.llm.width}x{cfg.llm.depth} LLM, "
        f"batch {args.batch}, {args.text_tokens} text tokens, scales {','.join(map(str, cfg.m3.scales))} every step, "
        f"float32, median of {args.steps} interleaved rounds. Peak: float32 2048^3 matmul, JAX "
        f"{peaks['jax'] / 1e9:.1f} GFLOP/s, torch {peaks['torch'] / 1e9:.1f} GFLOP/s ({threads} threads).\n")
  base = {b: med[b] for b in ("official", "once") if b in med}
  head = "".join(f" {b} / this |" for b in base)
  print(f"| step | s/step |{head} model GFLOP | GFLOP/s | MFU | loss (last) |")
  print("|---|---:|" + "---:|" * len(base) + "---:|---:|---:|---:|")
  for i in impls:
    rate = flops[i] / med[i]
    ratios = "".join(f" {base[b] / med[i]:.2f}x |" for b in base)
    print(f"| {i} | {med[i]:.2f} |{ratios} {flops[i] / 1e9:.1f} | {rate / 1e9:.1f} | "
          f"{rate / peaks[framework[i]]:.0%} | {losses[i][-1]:.4f} |")
  for i in impls:
    if isinstance(runners[i], JaxStep):
      print(f"\n{i}: compile {runners[i].compile_s:.1f}s, XLA temporaries {runners[i].temp_mib:.0f} MiB", end="")
  print(f"\n\n/proc/loadavg before: {' '.join(map(str, load_before))}; after: {load_after}")


if __name__ == "__main__":
  main()
