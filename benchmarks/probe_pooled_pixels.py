"""Model-free proof of the granularity probe: which pooled scales still hold each family's answer.

For each family and scale s, the raw 48x48 pixels are average-pooled to s cells (exactly what nested pooling
does to visual tokens, minus the encoder), each cell x (centred, /128) is expanded to per-token features
phi(x) = [x, upper(x x^T)] (9 numbers: what the projector MLP can compute per token), averaged over the cells
(a bag of tokens: position-free), and a linear classifier (ridge least squares to one-hot answers) is fitted on
train examples and scored on held-out ones. Chance is 1/6.

  .venv/bin/python -m benchmarks.probe_pooled_pixels [--train 3000 --test 1000 --seed 0]

Prints a markdown table (accuracy, %).
"""
from __future__ import annotations

import argparse

import numpy as np

from m3_jax.data import probe

SCALES = (1, 9, 36, 144)


def features(images: np.ndarray, scale: int) -> np.ndarray:
  """uint8[N, 48, 48, 3] -> float64[N, 10]: mean over pooled cells of [1, x, upper(x x^T)]."""
  x = (probe.pooled(images, scale).astype(np.float64) - probe.GREY) / 128.0   # [N, s, 3]
  iu = np.triu_indices(3)
  quad = (x[..., :, None] * x[..., None, :])[..., iu[0], iu[1]]               # [N, s, 6]
  phi = np.concatenate([x, quad], axis=-1).mean(axis=1)
  return np.concatenate([np.ones((len(phi), 1)), phi], axis=1)


def fit_predict(xtr, ytr, xte, n_classes, ridge=1e-6):
  y = np.eye(n_classes)[ytr]
  w = np.linalg.solve(xtr.T @ xtr + ridge * np.eye(xtr.shape[1]), xtr.T @ y)
  return (xte @ w).argmax(-1)


def table(n_train: int, n_test: int, seed: int) -> dict[str, dict[int, float]]:
  def collect(split, n):
    exs = [probe.example(seed, split, i) for i in range(n * len(probe.FAMILY_NAMES))]
    by = {}
    for e in exs:
      by.setdefault(e["family"], []).append(e)
    return {f: (np.stack([e["image"] for e in v]), np.array([probe.ANSWERS.index(e["answer"]) for e in v]))
            for f, v in by.items()}

  train, test = collect("train", n_train), collect("test", n_test)
  out = {}
  for fam in probe.FAMILY_NAMES:
    out[fam] = {}
    for s in SCALES:
      pred = fit_predict(features(train[fam][0], s), train[fam][1], features(test[fam][0], s),
                         len(probe.ANSWERS))
      out[fam][s] = float((pred == test[fam][1]).mean())
  return out


def markdown(result: dict[str, dict[int, float]]) -> str:
  lines = ["| family (needs) | " + " | ".join(f"{s} tok" for s in SCALES) + " |",
           "|---|" + "---:|" * len(SCALES)]
  for fam, accs in result.items():
    need = probe.FAMILIES[fam][0]
    lines.append(f"| {fam} ({need}) | " + " | ".join(f"{100 * accs[s]:.1f}" for s in SCALES) + " |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--train", type=int, default=3000, help="train examples per family")
  ap.add_argument("--test", type=int, default=1000, help="test examples per family")
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args(argv)
  print(markdown(table(a.train, a.test, a.seed)))
  print(f"\nchance = {100 / len(probe.ANSWERS):.1f}%  (train {a.train}, test {a.test} per family, seed {a.seed})")


if __name__ == "__main__":
  main()
