"""Model-free proof of the granularity probe: which pooled scales still hold each family's answer.

For each family and scale s, the raw 48x48 pixels are average-pooled to s cells (what nested pooling does to
visual tokens, minus the encoder). Each pooled cell's colour is quantised (9 levels per channel) and one-hot
encoded, these are summed over the cells (a bag of tokens: position-free, like content-based attention), crossed
with the question (one-hot), and a linear classifier (ridge least squares to one-hot answers) is fitted on train
examples and scored on held-out ones. Chance is 1/6; for the binding families, knowing the four values present but
not their keys gives 25%.

  .venv/bin/python -m benchmarks.probe_pooled_pixels [--families binding|presence] [--train 2000 --test 500]

Prints a markdown table (accuracy, %).
"""
from __future__ import annotations

import argparse

import numpy as np

from m3_jax.data import probe

SCALES = (1, 9, 36, 144)
LEVELS = 9


def features(images: np.ndarray, questions: list[str], scale: int) -> np.ndarray:
  """uint8[N, 48, 48, 3] -> float64[N, Q * LEVELS^3]: bag of one-hot pooled-cell colours, crossed with the question."""
  cells = np.rint(probe.pooled(images, scale) / 255.0 * (LEVELS - 1)).astype(np.int64)   # [N, s, 3]
  idx = (cells[..., 0] * LEVELS + cells[..., 1]) * LEVELS + cells[..., 2]                # [N, s]
  bag = np.zeros((len(images), LEVELS ** 3))
  np.add.at(bag, (np.repeat(np.arange(len(images)), scale), idx.ravel()), 1.0 / scale)
  qs = sorted(set(questions))
  q = np.eye(len(qs))[[qs.index(x) for x in questions]]                                # [N, Q]
  return np.concatenate([(q[:, :, None] * bag[:, None, :]).reshape(len(images), -1), q], axis=1)


def fit_predict(xtr, ytr, xte, n_classes, ridge=1e-3):
  keep = xtr.any(0)  # drop never-seen bins: the system stays small and well-posed
  xtr, xte = xtr[:, keep], xte[:, keep]
  y = np.eye(n_classes)[ytr]
  w = np.linalg.solve(xtr.T @ xtr + ridge * np.eye(xtr.shape[1]), xtr.T @ y)
  return (xte @ w).argmax(-1)


def table(n_train: int, n_test: int, seed: int, family_set: str = "binding") -> dict[str, dict[int, float]]:
  names, answers = probe.FAMILY_SETS[family_set], probe.answers(family_set)

  def collect(split, n):
    by = {}
    for i in range(n * len(names)):
      e = probe.example(seed, split, i, family_set)
      by.setdefault(e["family"], []).append(e)
    return {f: (np.stack([e["image"] for e in v]), [e["question"] for e in v],
                np.array([answers.index(e["answer"]) for e in v])) for f, v in by.items()}

  train, test = collect("train", n_train), collect("test", n_test)
  out = {}
  for fam in names:
    (xi, xq, y), (ti, tq, ty) = train[fam], test[fam]
    out[fam] = {}
    for s in SCALES:
      # Fit on train+test questions' union so both matrices share columns (a question unseen in train is fine).
      qs = xq + tq
      f = features(np.concatenate([xi, ti]), qs, s)
      pred = fit_predict(f[:len(y)], y, f[len(y):], len(answers))
      out[fam][s] = float((pred == ty).mean())
  return out


def markdown(result: dict[str, dict[int, float]]) -> str:
  lines = ["| family (needs) | " + " | ".join(f"{s} tok" for s in SCALES) + " |",
           "|---|" + "---:|" * len(SCALES)]
  for fam, accs in result.items():
    lines.append(f"| {fam} ({probe.needed_scale(fam)}) | " + " | ".join(f"{100 * accs[s]:.1f}" for s in SCALES) + " |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--families", default="binding", choices=tuple(probe.FAMILY_SETS))
  ap.add_argument("--train", type=int, default=2000, help="train examples per family")
  ap.add_argument("--test", type=int, default=500, help="test examples per family")
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args(argv)
  print(markdown(table(a.train, a.test, a.seed, a.families)))
  print(f"\nchance = {100 / len(probe.answers(a.families)):.1f}%  ({a.families} families; train {a.train}, "
        f"test {a.test} per family, seed {a.seed})")


if __name__ == "__main__":
  main()
