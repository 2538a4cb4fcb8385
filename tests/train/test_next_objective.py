"""LLaVA-NeXT training against an independent reference: transformers' LlavaNextForConditionalGeneration fed each
crop's pooled features, reassembled and unpadded by transformers' own functions, as `inputs_embeds`, one sample at a
time. A batch of non-square images with different crop grids (padding crops, left and right text padding, a
text-only row) must give the same per-scale loss at every scale and the same gradients; the training visual-token
count is inference's; random_per_sample's exact expectation over its draws is the `all` loss.

One converted tiny model and one compiled objective program serve the module.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_next import modeling_llava_next as hf_next
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from m3_jax import geometry
from m3_jax.checkpoint import m3dir
from m3_jax.data import pipeline
from m3_jax.data.anyres import anyres_crops
from m3_jax.data.image import ImageProcessorConfig
from m3_jax.labels import IGNORE
from m3_jax.models import anyres, llava
from m3_jax.train import objective as obj

from next_testlib import PINS, PROC, S, tiny_next_pair
from train_testlib import FAST_COMPILE

# (30, 130): 1x3 crops; (100, 37): 3x1; (40, 90): 1x2 (3 crops, padded to the batch's 4); None: text only.
SIZES = [(30, 130), (100, 37), (40, 90), None]
PAD_LEFT = [False, True, False, True]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  src, out = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("m3") / "ckpt"
  hf = tiny_next_pair(src, out)
  cfg, params, _ = m3dir.load(out)
  scales = tuple(cfg.m3.scales)
  assert scales == (144, 36, 9, 1)

  rng = np.random.default_rng(0)
  pcfg = ImageProcessorConfig.for_size(S)
  examples = []
  for i, hw in enumerate(SIZES):
    text = rng.integers(8, 40, 3 + i).tolist()
    answer = rng.integers(8, 40, 2 + i % 2).tolist()
    ids = [1] + ([4] if hw else []) + text + answer + [2]
    labels = [IGNORE] * (len(ids) - len(answer) - 1) + answer + [2]
    ex = {"input_ids": np.array(ids, np.int32), "labels": np.array(labels, np.int32), "has_image": hw is not None,
          "crops": np.zeros((1, S, S, 3), np.float32), "image_hw": np.zeros(2, np.int32)}
    if hw:
      img = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
      ex["crops"], size = anyres_crops(img, pcfg, cfg.anyres.grid_pinpoints, "hw")
      ex["image_hw"] = np.array(size, np.int32)
      ex["pil"] = img
    examples.append(ex)
  collate = pipeline.Collate((16,), 3, pcfg, anyres=dict(grid_pinpoints=cfg.anyres.grid_pinpoints, order="hw",
                                                         crop=S, scales=scales, crop_buckets=(3, 4, 5)))
  batch = collate(examples)
  assert batch["pixels"].shape == (4, 4, S, S, 3)   # 4 crops at most: the bucket 4
  for row, left in enumerate(PAD_LEFT):   # move these rows' tokens to the right end: left padding
    if left:
      n = int(batch["attention_mask"][row].sum())
      for k in ("input_ids", "labels", "attention_mask"):
        batch[k][row] = np.roll(batch[k][row], 16 - n)
  assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][0, -1] == 0
  return hf, cfg, params, scales, examples, batch


def reference_losses(hf, examples, scales):
  """torch: per-scale summed CE over the batch, each sample alone (no padding), and the M3 loss."""
  ce = []
  for s in scales:
    total = torch.zeros(())
    for ex in examples:
      emb = hf.get_input_embeddings()(torch.tensor([ex["input_ids"].tolist()]))
      if ex["has_image"]:
        proc = LlavaNextImageProcessorPil(**PROC)(ex["pil"], return_tensors="pt")
        pixels, size = proc["pixel_values"][0], proc["image_sizes"][0]
        feats = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        proj = hf.model.multi_modal_projector(feats)                                  # [C, 144, D]
        c, _, d = proj.shape
        k = int(round(s ** 0.5))
        pooled = torch.nn.functional.avg_pool2d(proj.transpose(1, 2).reshape(c, d, 12, 12), 12 // k)
        rows, cols = hf_next.get_anyres_image_grid_shape(size.tolist(), PINS, S)
        grid = pooled[1:].reshape(rows, cols, d, k, k).permute(2, 0, 3, 1, 4).reshape(d, rows * k, cols * k)
        grid = hf_next.unpad_image(grid, size)
        grid = torch.cat([grid, hf.model.image_newline[:, None, None].expand(d, grid.shape[1], 1)], dim=-1)
        image = torch.cat([pooled[0].reshape(d, s).T, grid.flatten(1).T], dim=0)
        p = int(np.flatnonzero(ex["input_ids"] == 4)[0])
        emb = torch.cat([emb[:, :p], image[None], emb[:, p + 1:]], dim=1)
        labels = np.concatenate([ex["labels"][:p], np.full(len(image), IGNORE), ex["labels"][p + 1:]])
      else:
        labels = ex["labels"]
      logits = hf(inputs_embeds=emb).logits[0]
      total = total + torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(labels[1:]).long(),
                                                        ignore_index=IGNORE, reduction="sum")
    ce.append(total)
  n = sum(int((ex["labels"][1:] != IGNORE).sum()) for ex in examples)
  per_scale = torch.stack(ce) / n
  return per_scale, per_scale.mean(), n


@pytest.fixture(scope="module")
def ours(setup):
  _, cfg, params, scales, _, batch = setup
  objective = obj.Objective(llava.LlavaM3(cfg), scales)
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  params = jax.tree_util.tree_map(jnp.asarray, params)

  def loss(p, b):
    ce = objective.all_scales_ce(p, b)
    return obj.m3_loss(ce, obj.count_targets(b, cfg.image_token_id), jnp.ones(len(scales)))

  fn = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params, b).compile(compiler_options=FAST_COMPILE)
  (m3, per_scale), grads = fn(params, b)
  return dict(objective=objective, params=params, batch=b, m3=float(m3), per_scale=np.asarray(per_scale),
              grads=jax.device_get(grads))


def test_per_scale_loss_and_gradients_match_transformers_llava_next(setup, ours):
  hf, cfg, _, scales, examples, _ = setup
  per_scale, m3, n = reference_losses(hf, examples, scales)
  assert int(obj.count_targets(ours["batch"], cfg.image_token_id)) == n
  np.testing.assert_allclose(ours["per_scale"], per_scale.detach().numpy(), atol=1e-4, rtol=0)
  assert abs(ours["m3"] - m3.item()) <= 1e-4
  m3.backward()
  # image_newline only reaches the loss through the packing; the projector through every crop's pooled tokens.
  np.testing.assert_allclose(ours["grads"]["image_newline"], hf.model.image_newline.grad.numpy(), atol=1e-5,
                             rtol=1e-3)
  np.testing.assert_allclose(ours["grads"]["projector"]["linear_1"]["kernel"],
                             hf.model.multi_modal_projector.linear_1.weight.grad.numpy().T, atol=1e-5, rtol=1e-3)
  assert float(np.abs(ours["grads"]["image_newline"]).max()) > 1e-4   # a gradient that is there to agree on


def test_training_visual_tokens_equal_inference_count(setup):
  _, cfg, _, scales, examples, batch = setup
  for s in scales:
    index = batch[obj.index_key(s)]
    for row, ex in enumerate(examples):
      got = int((index[row] >= 0).sum())
      want = anyres.visual_tokens(cfg, tuple(ex["image_hw"]), s) if ex["has_image"] else 0
      assert got == want, (s, row)
      if ex["has_image"]:   # inference's packing plan (crops numbered in the batch's bucket), padding first
        plan = geometry.pack_indices(tuple(ex["image_hw"]), s, **anyres.geometry_args(cfg),
                                     crops=batch["pixels"].shape[1])
        np.testing.assert_array_equal(index[row, -want:], plan)
        assert (index[row, :-want] == -1).all()
  # (30, 130) at 144 per crop: base 144 + a 12x36 map unpadded to 8 rows, a newline each (test_anyres).
  assert int((batch[obj.index_key(144)][0] >= 0).sum()) == 144 + 8 * 37


def test_random_per_sample_expectation_over_every_draw_is_the_all_loss(setup, ours):
  _, cfg, _, scales, _, _ = setup
  objective, params, b = ours["objective"], ours["params"], ours["batch"]
  n = obj.count_targets(b, cfg.image_token_id)
  fn = jax.jit(lambda p, b, g: obj.m3_loss(objective.per_sample_ce(p, b, g), n, jnp.ones(len(scales)))[0])
  rows, m = b["input_ids"].shape[0], len(scales)
  assert rows == m   # groups of one row: every assignment of the 4 rows to the 4 scales, 4! draws
  draws = [np.array(p, np.int32).reshape(m, 1) for p in itertools.permutations(range(rows))]
  compiled = fn.lower(params, b, draws[0]).compile(compiler_options=FAST_COMPILE)
  losses = [float(compiled(params, b, g)) for g in draws]
  assert len(set(np.round(losses, 6))) > 1   # the draw matters
  np.testing.assert_allclose(np.mean(losses), ours["m3"], atol=1e-5, rtol=0)
