"""The granularity probe: procedurally generated VQA whose question families need known numbers of visual tokens.

48x48 images (the tiny config; patch 4 -> a 12x12 grid). Pooling to scale s gives cells of 48/sqrt(s) pixels:
1 -> 48, 9 -> 16, 36 -> 8, 144 -> 4. Answers (what is scored) are one word.

What pooling can and cannot lose. M3 pools AFTER the vision encoder and projector, so a coarse token is the mean
of per-token features that a ViT computed while seeing the whole image. Whatever is a sum over tokens survives: the
presence and colour of any object, counts. What pooling loses is which feature sat with which when several objects
share a pooled cell: binding. So the default ("binding") families ask for an attribute of one object picked by
another of its attributes:

  whole   (needs 1)    one object fills the picture
  blocks  (needs 9)    4 objects, 16 px, in 4 cells of the 3x3 grid
  tiles   (needs 36)   4 objects, 8 px, filling the four quadrants of one 16 px cell
  patches (needs 144)  4 objects, 4 px, filling the four quadrants of one 8 px cell
  "what colour is next to the {key}?"  -> reply "{key} {value}", scored on {value}

Each object is a square of 1 px vertical stripes alternating a key colour (black, maroon, crimson, red: the 4
objects of an image have the 4 keys) and a value colour (4 of green, blue, cyan, teal, navy, azure: distinct), on
white, so every token that sees an object sees both its colours. At the family's scale and finer, no token mixes two
objects, so the answer is a content lookup (attend to a token with the key, read its value). One scale coarser, all
four objects share one token: keys and values are still there but unbound, so the best a model can do is guess one
of the four values (25%; chance over answers 1/6).

The "presence" families (the first design, kept for the comparison) need the same pixels but no binding:
  colour "what colour is the picture?" (1); big / small / tiny "what colour are the {size} squares?" (9 / 36 / 144):
  two squares of complementary colours c and 255 - c on grey inside one cell of the next coarser scale, so that
  cell's mean pixel is the same for every c. Pixel pooling destroys the answer below the family's scale, but the
  model pools nonlinear features and learns all four families at every scale within ~40 steps.

Measured on the tiny model (benchmarks/probe_learnability.py): the binding lookup stays at the 25% plateau through
800 steps of the M3 objective (the coarse scales, where it is impossible, pull towards "average the values"), but
is learned at 144 tokens alone, and then the M3 objective keeps it exactly where the design says it is possible.

Non-square images (LLaVA-NeXT, `aspects`): a W:H aspect renders a (48*H) x (48*W) canvas, the same families laid
out over the whole canvas (whole: one object fills it; blocks: 4 of the 3x3 cells of every 48 px square; tiles and
patches: the quadrants of one 16 / 8 px cell anywhere). The tiny NeXT pinpoints (48x48, 48x96, 96x48, 96x96) cut
such a canvas into 48 px crops along those squares, so objects within one crop share a pooled token one scale
coarser than their family needs (tiles and patches always: their four objects lie in one cell; blocks' four may
spread over two crops); the base crop sees the whole canvas squashed. Example i's aspect is
aspects[(i // #families) % #aspects], so families and aspects are balanced together.

Everything is deterministic from (seed, split, index); families are balanced exactly (index % #families).
The TFDS builder (`Probe`) uses only Tensor/Text features so it builds array_record files without TensorFlow.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import io
import os
import tempfile

import numpy as np
from etils import epath

IMAGE_SIZE = 48
GREY = 128
WHITE = 255

# ---- binding families (default)
KEYS = {"black": (0, 0, 0), "maroon": (85, 0, 0), "crimson": (170, 0, 0), "red": (255, 0, 0)}
VALUES = {"green": (0, 255, 0), "blue": (0, 0, 255), "cyan": (0, 255, 255), "teal": (0, 128, 128),
          "navy": (0, 0, 128), "azure": (0, 128, 255)}
BINDING = {  # family -> (scale it needs, object side in pixels)
    "whole": (1, 48),
    "blocks": (9, 16),
    "tiles": (36, 8),
    "patches": (144, 4),
}
BINDING_QUESTION = "what colour is next to the {key}?"

# ---- presence families (first design)
COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "orange": (255, 128, 0),
    "purple": (128, 0, 255),
    "pink": (255, 0, 128),
}
PRESENCE = {  # family -> (scale it needs, square side in pixels, question)
    "colour": (1, 48, "what colour is the picture?"),
    "big": (9, 16, "what colour are the big squares?"),
    "small": (36, 8, "what colour are the small squares?"),
    "tiny": (144, 4, "what colour are the tiny squares?"),
}

FAMILY_SETS = {"binding": tuple(BINDING), "presence": tuple(PRESENCE)}
FAMILY_NAMES = FAMILY_SETS["binding"]
SPLITS = {"train": 0, "validation": 1, "test": 2}
DEFAULT_SIZES = {"train": 4000, "validation": 2000, "test": 400}


def needed_scale(family: str) -> int:
  return BINDING[family][0] if family in BINDING else PRESENCE[family][0]


def answers(family_set: str = "binding") -> tuple[str, ...]:
  return tuple(VALUES) if family_set == "binding" else tuple(COLOURS)


def vocabulary() -> list[str]:
  """Every word a probe question or answer uses, in both family sets (for the tiny word-level tokenizer)."""
  words = BINDING_QUESTION.replace("?", " ?").split() + list(KEYS) + list(VALUES)
  for _, _, q in PRESENCE.values():
    words += q.replace("?", " ?").split()
  return [w for w in dict.fromkeys(words + list(COLOURS)) if w != "{key}"]


def parse_aspects(aspects) -> tuple[tuple[int, int], ...]:
  """"1:1,2:1,1:2" (or a sequence of "W:H") -> ((1, 1), (2, 1), (1, 2)) as (W, H) in units of 48 px."""
  items = aspects.split(",") if isinstance(aspects, str) else list(aspects)
  out = []
  for item in items:
    try:
      w, h = (int(x) for x in str(item).strip().split(":"))
    except ValueError:
      raise ValueError(f"probe aspect {item!r}: expected W:H in whole numbers, e.g. 2:1 (a 96x48 image)") from None
    if not (1 <= w <= 4 and 1 <= h <= 4):
      raise ValueError(f"probe aspect {item!r}: W and H must be 1 to 4 (multiples of the 48 px crop)")
    out.append((w, h))
  if not out:
    raise ValueError("probe aspects: expected at least one W:H, e.g. 1:1")
  return tuple(out)


def _quadrant_cells(rng, side: int, hw: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> list[tuple[int, int]]:
  """The four quadrant cells (row, col in units of `side`) of one random cell of side 2 * side in an (h, w) image."""
  ny, nx = hw[0] // (2 * side), hw[1] // (2 * side)
  oy, ox = divmod(int(rng.integers(ny * nx)), nx)
  return [(2 * oy + q // 2, 2 * ox + q % 2) for q in range(4)]


def render_binding(family: str, rng: np.random.Generator, aspect: tuple[int, int] = (1, 1)
                   ) -> tuple[np.ndarray, str, str]:
  """(uint8[48*H, 48*W, 3], key asked about, its value) for a binding family at aspect (W, H)."""
  _, side = BINDING[family]
  h, w = IMAGE_SIZE * aspect[1], IMAGE_SIZE * aspect[0]
  img = np.full((h, w, 3), WHITE, np.uint8)
  if family == "whole":
    cells, side = [(0, 0)], None
  elif family == "blocks":
    nx = 3 * aspect[0]
    cells = [divmod(int(c), nx) for c in rng.choice(9 * aspect[0] * aspect[1], size=4, replace=False)]
  else:
    cells = _quadrant_cells(rng, side, (h, w))
  keys = [list(KEYS)[int(i)] for i in rng.permutation(len(KEYS))[:len(cells)]]
  values = [list(VALUES)[int(i)] for i in rng.choice(len(VALUES), size=len(cells), replace=False)]
  for (y, x), k, v in zip(cells, keys, values):
    # 1 px vertical stripes, key then value: every 4 px patch (every token at every scale) holds both halves.
    obj = img if side is None else img[y * side:(y + 1) * side, x * side:(x + 1) * side]
    obj[:, 0::2] = KEYS[k]
    obj[:, 1::2] = VALUES[v]
  q = int(rng.integers(len(cells)))
  return img, keys[q], values[q]


def render_presence(family: str, colour: str, rng: np.random.Generator) -> np.ndarray:
  """uint8[48, 48, 3] image of a presence family whose answer is `colour`."""
  c = np.asarray(COLOURS[colour], np.uint8)
  if family == "colour":
    return np.broadcast_to(c, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
  _, side, _ = PRESENCE[family]
  img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), GREY, np.uint8)
  if family == "big":
    # Any two distinct cells of the 3x3 grid: the coarser "cell" is the whole image.
    a, b = rng.choice(9, size=2, replace=False)
    cells = [divmod(int(a), 3), divmod(int(b), 3)]
  else:
    quads = _quadrant_cells(rng, side)
    cells = [quads[int(q)] for q in rng.choice(4, size=2, replace=False)]
  for (y, x), colour_value in zip(cells, (c, 255 - c)):
    img[y * side:(y + 1) * side, x * side:(x + 1) * side] = colour_value
  return img


def example(seed: int, split: str, index: int, family_set: str = "binding", aspects="1:1") -> dict:
  """The probe example `index` of `split`: {id, image uint8[48*H,48*W,3], question, answer, reply, family, scale}
  (aspect W:H from `aspects`, see the module docstring; 1:1 is 48x48).

  `answer` is the one word that is scored; `reply` is what the model is trained to say. For the binding families
  the reply restates the key first ("black green"): copying the key from the question and then looking its value
  up from the key's own position are each one attention hop, which the tiny model learns in a few hundred steps;
  answering directly needs both hops composed at one position and stayed at 25% (the four values, unbound) after
  300 steps at every scale.
  """
  if family_set not in FAMILY_SETS:
    raise ValueError(f"probe family set {family_set!r} is not one of {', '.join(FAMILY_SETS)}")
  rng = np.random.default_rng([seed, SPLITS[split], index])
  names = FAMILY_SETS[family_set]
  family = names[index % len(names)]
  shapes = parse_aspects(aspects)
  aspect = shapes[(index // len(names)) % len(shapes)]
  if family_set == "binding":
    image, key, answer = render_binding(family, rng, aspect)
    question, reply = BINDING_QUESTION.format(key=key), f"{key} {answer}"
  else:
    if aspect != (1, 1):
      raise ValueError(f"probe aspects {aspects!r}: the presence families are square only (use binding)")
    answer = tuple(COLOURS)[int(rng.integers(len(COLOURS)))]
    image, question = render_presence(family, answer, rng), PRESENCE[family][2]
    reply = answer
  return dict(id=f"{split}-{index}", image=image, question=question, answer=answer, reply=reply, family=family,
              scale=np.int32(needed_scale(family)))


def conversation(ex: dict) -> list[dict]:
  """The example as a LLaVA `conversations` list (image first, then the reply)."""
  return [{"from": "human", "value": "<image>\n" + ex["question"]}, {"from": "gpt", "value": ex["reply"]}]


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
  family_set: str = "binding"
  num_train: int = DEFAULT_SIZES["train"]
  num_validation: int = DEFAULT_SIZES["validation"]
  num_test: int = DEFAULT_SIZES["test"]
  aspects: str = "1:1"


class Probe(tfds.core.GeneratorBasedBuilder):
  """M3 granularity probe (see m3_jax/data/probe.py)."""
  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.1.0": "binding families; `reply` (trained text) beside `answer` (scored word)",
                   "1.2.0": "2000 validation examples by default (the scale router's calibration split); the "
                            "examples are unchanged (they depend on seed, split and index only)"}
  BUILDER_CONFIGS = [ProbeConfig(name="default")]

  def _info(self):
    f = tfds.features
    square = parse_aspects(self.builder_config.aspects) == ((1, 1),)
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3) if square else (None, None, 3)
    return self.dataset_info_from_configs(
        features=f.FeaturesDict({
            "id": f.Text(),
            "image": f.Tensor(shape=shape, dtype=np.uint8, **({} if square else {"encoding": "zlib"})),
            "question": f.Text(),
            "answer": f.Text(),
            "reply": f.Text(),
            "family": f.Text(),
            "scale": f.Tensor(shape=(), dtype=np.int32),
        }),
        description="M3 granularity probe: questions that need 1, 9, 36 or 144 visual tokens.",
    )

  def _split_generators(self, dl_manager):
    c = self.builder_config
    sizes = {"train": c.num_train, "validation": c.num_validation, "test": c.num_test}
    return {split: self._generate_examples(split, n) for split, n in sizes.items()}

  def _generate_examples(self, split, n):
    for i in range(n):
      c = self.builder_config
      yield i, example(c.seed, split, i, c.family_set, c.aspects)


def builder(data_dir: str, *, seed: int = 0, sizes: dict | None = None, family_set: str = "binding",
            aspects="1:1"):
  """The TFDS builder for the probe with this seed, split sizes and aspects, storing array_record files in
  data_dir. Non-square aspects add `_a{W}x{H}-...` to the config name."""
  sizes = {**DEFAULT_SIZES, **(sizes or {})}
  if family_set not in FAMILY_SETS:
    raise ValueError(f"probe family set {family_set!r} is not one of {', '.join(FAMILY_SETS)}")
  shapes = parse_aspects(aspects)
  aspects = ",".join(f"{w}:{h}" for w, h in shapes)
  suffix = "" if shapes == ((1, 1),) else "_a" + "-".join(f"{w}x{h}" for w, h in shapes)
  if seed == 0 and sizes == DEFAULT_SIZES and family_set == "binding" and not suffix:
    config = "default"
  else:
    config = ProbeConfig(name=f"{family_set}_s{seed}_{sizes['train']}_{sizes['validation']}_{sizes['test']}{suffix}",
                         seed=seed, family_set=family_set, num_train=sizes["train"],
                         num_validation=sizes["validation"], num_test=sizes["test"], aspects=aspects)
  return Probe(data_dir=str(data_dir), config=config, file_format="array_record")


def built(data_dir: str) -> dict[str, str]:
  """{config name: its folder} for every probe built in `data_dir` (`m3 data probe --out data_dir`), any seed and
  sizes ("default" is seed 0 with DEFAULT_SIZES; others are named family_set_sSEED_TRAIN_VALIDATION_TEST)."""
  root = epath.Path(data_dir) / Probe.name  # gs://... too
  # Any finished version (an older build is read as built; TFDS's `incomplete.*` folders are not versions); a config
  # built at several versions: the newest.
  folders = [f for f in root.glob("*/*/dataset_info.json") if tfds.core.Version.is_valid(f.parent.name)] \
      if root.is_dir() else []
  return {f.parent.parent.name: str(f.parent)
          for f in sorted(folders, key=lambda f: tfds.core.Version(f.parent.name))}


def built_sizes(data_dir: str, *, seed: int = 0, family_set: str = "binding", aspects="1:1") -> dict | None:
  """The split sizes of the probe with this seed, family set and aspects already built in `data_dir` (by
  `m3 data probe --out data_dir --train N ...`), so that training reads it instead of building the default sizes
  beside it; None when there is none. Several such probes: ValueError naming them."""
  shapes = parse_aspects(aspects)
  suffix = "" if shapes == ((1, 1),) else "_a" + "-".join(f"{w}x{h}" for w, h in shapes)
  pattern = re.compile(rf"{re.escape(family_set)}_s{seed}_(\d+)_(\d+)_(\d+){re.escape(suffix)}")
  found = {}
  for name in built(data_dir):
    if name == "default" and seed == 0 and family_set == "binding" and not suffix:
      found[name] = dict(DEFAULT_SIZES)
    elif m := pattern.fullmatch(name):
      found[name] = dict(zip(("train", "validation", "test"), map(int, m.groups())))
  if len(found) > 1:
    raise ValueError(f"{data_dir} holds {len(found)} probes of seed {seed}, {family_set} families and aspects "
                     f"{aspects} ({', '.join(found)}); remove all but one, or set data.probe_size")
  return next(iter(found.values()), None)


def open_built(data_dir: str, config: str | None = None):
  """The probe built in `data_dir`, read as built (its seed and sizes included; nothing is generated): a read-only
  TFDS builder. `config` names one when the folder holds several; FileNotFoundError / ValueError otherwise."""
  found = built(data_dir)
  if not found:
    raise FileNotFoundError(f"{data_dir}: no granularity probe built there (expected {Probe.name}/CONFIG/"
                            f"VERSION/); build one with `m3 data probe --out {data_dir}`")
  if config is None and len(found) > 1:
    raise ValueError(f"{data_dir} holds {len(found)} probes ({', '.join(found)}); choose one with "
                     f"--task-option config=NAME")
  name = config if config is not None else next(iter(found))
  if name not in found:
    raise ValueError(f"{data_dir}: no probe {name!r} built there; it holds {', '.join(found)}")
  return tfds.builder_from_directory(_readable(found[name], data_dir))


def build(data_dir: str, *, seed: int = 0, sizes: dict | None = None, family_set: str = "binding",
          aspects="1:1"):
  """Generates the probe (idempotent) and returns its builder; `builder.as_data_source(split)` reads it.

  array_record files are written and read by local file IO only: in an object-store `data_dir` (gs://...) the probe
  is built in a local folder and uploaded (or a copy already there is downloaded), and the builder reads the local
  copy."""
  remote = _is_remote(data_dir)
  local = tempfile.mkdtemp(prefix="m3_probe_") if remote else data_dir
  with _quiet():
    b = builder(local, seed=seed, sizes=sizes, family_set=family_set, aspects=aspects)
    if remote:
      there = _remote_twin(b.data_dir, local, data_dir)
      if (there / "dataset_info.json").exists():
        _copy_tree(there, epath.Path(b.data_dir))
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        beam_options=None, try_download_gcs=False))
  if remote and not (there / "dataset_info.json").exists():
    _copy_tree(epath.Path(b.data_dir), there)
  return b


def _is_remote(path) -> bool:
  return "://" in str(path)


def _remote_twin(local_dir: str, local_root: str, remote_root: str) -> epath.Path:
  return epath.Path(remote_root) / os.path.relpath(local_dir, local_root)


def _readable(folder: str, data_dir: str) -> str:
  """A probe folder as array_record's local file IO can open it: itself, or a local copy of an object-store one."""
  if not _is_remote(folder):
    return folder
  local = epath.Path(tempfile.mkdtemp(prefix="m3_probe_")) / os.path.relpath(folder, str(data_dir))
  _copy_tree(epath.Path(folder), local)
  return str(local)


def _copy_tree(src: epath.Path, dst: epath.Path):
  dst.mkdir(parents=True, exist_ok=True)
  for f in src.iterdir():
    if f.is_dir():
      _copy_tree(f, dst / f.name)
    else:
      f.copy(dst / f.name, overwrite=True)


@contextlib.contextmanager
def _quiet():
  """Keeps TFDS's dataset-building notices ("Using custom data configuration", "Downloading and preparing
  dataset", "Dataset probe downloaded and prepared") out of the log: nothing is downloaded, the probe is rendered
  locally (the first is an absl warning: absl's log shows only errors while the probe builds)."""
  from absl import logging as absl_logging
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    absl_logging.set_verbosity(level)
