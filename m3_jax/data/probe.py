"""The granularity probe: procedurally generated VQA whose question families need known numbers of visual tokens.

48x48 images (the tiny config; patch 4 -> a 12x12 grid). Average pooling to scale s gives cells of
48/sqrt(s) pixels: 1 -> 48, 9 -> 16, 36 -> 8, 144 -> 4. Families (answers: one colour word of six):

  colour (needs 1)    "what colour is the picture?"       the whole image is one colour.
  big    (needs 9)    "what colour are the big squares?"  two 16 px squares (two cells of the 3x3 grid).
  small  (needs 36)   "what colour are the small squares?" two 8 px squares inside one 16 px cell.
  tiny   (needs 144)  "what colour are the tiny squares?" two 4 px squares inside one 8 px cell.

The two squares of a pair have complementary colours c and 255 - c on a grey (128) background, and they share one
cell of the next coarser scale, so that cell averages to 127.5 whatever c is: below the family's scale the answer
is not just blurred, it is gone (every pooled token is the same for every answer). At or above the family's
scale two tokens are pure c and 255 - c, and the answer is the name of c. Questions are answered by finding the
non-grey tokens and reading their colour (content-based attention), not by looking a position up: the prototype in
DESIGN.md found colour questions learnable in minutes and position questions not.

Everything is deterministic from (seed, split, index); families are balanced exactly (index % 4).
The TFDS builder (`Probe`) uses only Tensor/Text features so it builds array_record files without TensorFlow.
"""
from __future__ import annotations

import dataclasses

import numpy as np

IMAGE_SIZE = 48
GREY = 128
# Primary colours named by the answers; each square pair is (c, 255 - c).
COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "orange": (255, 128, 0),
    "purple": (128, 0, 255),
    "pink": (255, 0, 128),
}
ANSWERS = tuple(COLOURS)
# family -> (scale it needs, square side in pixels, question)
FAMILIES = {
    "colour": (1, 48, "what colour is the picture?"),
    "big": (9, 16, "what colour are the big squares?"),
    "small": (36, 8, "what colour are the small squares?"),
    "tiny": (144, 4, "what colour are the tiny squares?"),
}
FAMILY_NAMES = tuple(FAMILIES)
SPLITS = {"train": 0, "validation": 1, "test": 2}
DEFAULT_SIZES = {"train": 4000, "validation": 400, "test": 400}


def vocabulary() -> list[str]:
  """Every word a probe question or answer uses (for the tiny word-level tokenizer)."""
  words = []
  for _, _, q in FAMILIES.values():
    words += q.replace("?", " ?").split()
  return list(dict.fromkeys(words + list(ANSWERS)))


def render(family: str, colour: str, rng: np.random.Generator) -> np.ndarray:
  """uint8[48, 48, 3] image of `family` whose answer is `colour`."""
  c = np.asarray(COLOURS[colour], np.uint8)
  if family == "colour":
    return np.broadcast_to(c, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
  _, side, _ = FAMILIES[family]
  img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), GREY, np.uint8)
  if family == "big":
    # Any two distinct cells of the 3x3 grid: the coarser "cell" is the whole image.
    a, b = rng.choice(9, size=2, replace=False)
    cells = [divmod(int(a), 3), divmod(int(b), 3)]
  else:
    # Two of the four quadrants of one cell of the next coarser grid (side 2 * side).
    n_outer = IMAGE_SIZE // (2 * side)
    oy, ox = divmod(int(rng.integers(n_outer * n_outer)), n_outer)
    a, b = rng.choice(4, size=2, replace=False)
    cells = [(2 * oy + int(q) // 2, 2 * ox + int(q) % 2) for q in (a, b)]
  for (y, x), colour_value in zip(cells, (c, 255 - c)):
    img[y * side:(y + 1) * side, x * side:(x + 1) * side] = colour_value
  return img


def example(seed: int, split: str, index: int) -> dict:
  """The probe example `index` of `split`: {id, image uint8[48,48,3], question, answer, family, scale}."""
  rng = np.random.default_rng([seed, SPLITS[split], index])
  family = FAMILY_NAMES[index % len(FAMILY_NAMES)]
  colour = ANSWERS[int(rng.integers(len(ANSWERS)))]
  scale, _, question = FAMILIES[family]
  return dict(id=f"{split}-{index}", image=render(family, colour, rng), question=question, answer=colour,
              family=family, scale=np.int32(scale))


def conversation(ex: dict) -> list[dict]:
  """The example as a LLaVA `conversations` list (image first, one-word answer)."""
  return [{"from": "human", "value": "<image>\n" + ex["question"]}, {"from": "gpt", "value": ex["answer"]}]


def pooled(images: np.ndarray, scale: int) -> np.ndarray:
  """uint8[N, 48, 48, 3] -> float32[N, scale, 3]: the raw-pixel analogue of pooling the visual tokens."""
  g = int(round(scale ** 0.5))
  n = images.shape[0]
  x = images.astype(np.float32).reshape(n, g, IMAGE_SIZE // g, g, IMAGE_SIZE // g, 3)
  return x.mean(axis=(2, 4)).reshape(n, scale, 3)


# -------------------------------------------------------------------------------------------------- TFDS


import tensorflow_datasets as tfds  # noqa: E402  (Tensor/Text features only: no TensorFlow needed)


@dataclasses.dataclass
class ProbeConfig(tfds.core.BuilderConfig):
  seed: int = 0
  num_train: int = DEFAULT_SIZES["train"]
  num_validation: int = DEFAULT_SIZES["validation"]
  num_test: int = DEFAULT_SIZES["test"]


class Probe(tfds.core.GeneratorBasedBuilder):
  """M3 granularity probe (see m3_jax/data/probe.py)."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [ProbeConfig(name="default")]

  def _info(self):
    f = tfds.features
    return self.dataset_info_from_configs(
        features=f.FeaturesDict({
            "id": f.Text(),
            "image": f.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            "question": f.Text(),
            "answer": f.Text(),
            "family": f.Text(),
            "scale": f.Tensor(shape=(), dtype=np.int32),
        }),
        description="M3 granularity probe: colour questions that need 1, 9, 36 or 144 visual tokens.",
    )

  def _split_generators(self, dl_manager):
    c = self.builder_config
    sizes = {"train": c.num_train, "validation": c.num_validation, "test": c.num_test}
    return {split: self._generate_examples(split, n) for split, n in sizes.items()}

  def _generate_examples(self, split, n):
    for i in range(n):
      yield i, example(self.builder_config.seed, split, i)


def builder(data_dir: str, *, seed: int = 0, sizes: dict | None = None):
  """The TFDS builder for the probe with this seed and split sizes, storing array_record files in data_dir."""
  sizes = {**DEFAULT_SIZES, **(sizes or {})}
  if seed == 0 and sizes == DEFAULT_SIZES:
    config = "default"
  else:
    config = ProbeConfig(name=f"s{seed}_{sizes['train']}_{sizes['validation']}_{sizes['test']}", seed=seed,
                         num_train=sizes["train"], num_validation=sizes["validation"], num_test=sizes["test"])
  return Probe(data_dir=str(data_dir), config=config, file_format="array_record")


def build(data_dir: str, *, seed: int = 0, sizes: dict | None = None):
  """Generates the probe (idempotent) and returns its builder; `builder.as_data_source(split)` reads it."""
  b = builder(data_dir, seed=seed, sizes=sizes)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(
      beam_options=None, try_download_gcs=False))
  return b
