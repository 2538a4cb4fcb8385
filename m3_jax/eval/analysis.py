"""Granularity analysis of `m3 eval` runs: score per scale (per task and per question family), the oracle, a
markdown report and the paper's Figure-2-style plot (score against visual tokens).

Input: eval directories, each holding `predictions.jsonl` (one object per sample and scale, at least
`question_id`, `scale`, `prediction`, `score`; optionally `category`) and usually `summary.json` (its `task` names
the run). No JAX here: analysis runs anywhere.

Oracle (paper Sec. 4.2, Table 2): per sample, the smallest scale whose score >= `threshold` answers it; a sample no
scale answers counts as 1 token; the oracle score is the fraction answered at any scale. Samples that lack a
prediction at some scale of their run are left out of the oracle (their scale is unknown) and counted as
`incomplete`.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
from typing import Iterable

from m3_jax.eval import predictions
from m3_jax.eval.metrics import mean
from m3_jax.eval.stats import bootstrap_ci

DEFAULT_THRESHOLD = 0.5
UNANSWERED_TOKENS = 1  # the oracle spends the fewest tokens on a sample that no scale answers


@dataclasses.dataclass
class Run:
  """One eval directory: its task and its predictions keyed by (question_id, scale)."""
  name: str                                    # label in tables and plots
  task: str
  path: str
  scores: dict[str, dict[int, float]]          # question_id -> scale -> score
  categories: dict[str, str | None]            # question_id -> category

  @property
  def scales(self) -> list[int]:
    return sorted({s for per in self.scores.values() for s in per}, reverse=True)


def read_run(path: str | pathlib.Path, name: str | None = None) -> Run:
  """Reads an eval directory (or a predictions.jsonl file). A later line for the same (question_id, scale) wins,
  as after a resumed eval."""
  file = predictions.predictions_file(path)
  if not file.exists():
    raise FileNotFoundError(f"{path}: no predictions.jsonl (expected the --out directory of `m3 eval`)")
  records = predictions.read(file, ("question_id", "scale", "score"), who="`m3 analyze`")
  scores: dict[str, dict[int, float]] = collections.defaultdict(dict)
  categories: dict[str, str | None] = {}
  for (qid, scale), rec in predictions.latest(records).items():
    if rec["score"] is None:
      raise ValueError(f"{file}: score is null for question_id={qid!r} at scale {scale}; the task has no "
                       "per-sample score, so the oracle cannot be computed")
    scores[qid][scale] = float(rec["score"])
    categories[qid] = rec.get("category") or categories.get(qid)
  return Run(name=name or _task(file.parent), task=_task(file.parent), path=str(file.parent), scores=dict(scores),
             categories=categories)


def _task(folder: pathlib.Path) -> str:
  """The run's task: summary.json's `task`, else the folder's name."""
  return predictions.read_summary(folder).get("task", folder.name)


def per_scale(run: Run, qids: Iterable[str] | None = None) -> dict[int, dict]:
  """scale -> {"score": mean score, "count": samples, "ci": [lo, hi] its 95% bootstrap interval over questions}
  over `qids` (default all)."""
  qids = list(run.scores) if qids is None else list(qids)
  out = {}
  for s in run.scales:
    vals = [run.scores[q][s] for q in qids if s in run.scores[q]]
    if vals:
      out[s] = {"score": mean(vals), "count": len(vals), "ci": list(bootstrap_ci(vals))}
  return out


def oracle(run: Run, threshold: float = DEFAULT_THRESHOLD, qids: Iterable[str] | None = None) -> dict:
  """The per-sample cheapest answering scale.

  Returns {"score": fraction answered at any scale, "ci": [lo, hi] its 95% bootstrap interval over questions,
  "mean_tokens": mean oracle tokens, "count": samples used, "incomplete": samples left out for lacking some scale,
  "chosen": {question_id: tokens}, "histogram": {tokens: samples}}.
  """
  scales = run.scales
  qids = list(run.scores) if qids is None else list(qids)
  chosen, answered, incomplete = {}, [], 0
  for q in qids:
    per = run.scores[q]
    if any(s not in per for s in scales):
      incomplete += 1
      continue
    good = [s for s in scales if per[s] >= threshold]
    answered.append(float(bool(good)))
    chosen[q] = min(good) if good else UNANSWERED_TOKENS
  n = len(chosen)
  hist = collections.Counter(chosen.values())
  return {"score": mean(answered) if n else float("nan"), "ci": list(bootstrap_ci(answered)),
          "mean_tokens": mean(chosen.values()) if n else float("nan"),
          "count": n, "incomplete": incomplete, "chosen": chosen,
          "histogram": {int(k): hist[k] for k in sorted(hist, reverse=True)}}


def analyze(runs: list[Run], threshold: float = DEFAULT_THRESHOLD) -> dict:
  """Everything the report shows, as plain data (written as analysis.json)."""
  out = {"threshold": threshold, "runs": []}
  for run in runs:
    cats = sorted({c for c in run.categories.values() if c is not None})
    by_cat = {}
    for c in cats:
      qids = [q for q in run.scores if run.categories.get(q) == c]
      o = oracle(run, threshold, qids)
      by_cat[c] = {"per_scale": per_scale(run, qids),
                   "oracle": {k: o[k] for k in ("score", "ci", "mean_tokens", "count")}}
    o = oracle(run, threshold)
    out["runs"].append({
        "name": run.name, "task": run.task, "path": run.path, "scales": run.scales,
        "per_scale": per_scale(run),
        "oracle": {k: v for k, v in o.items() if k != "chosen"},
        "categories": by_cat,
    })
  return out


def _fmt(x: float) -> str:
  return "nan" if x != x else f"{100 * x:.1f}"


def report_markdown(result: dict) -> str:
  """Scores are shown in percent; tokens are visual tokens per image (per grid for NeXT)."""
  lines = ["# M3 granularity report", "",
           f"A sample counts as answered at a scale when its score >= {result['threshold']}. Oracle: per sample "
           f"the smallest answering scale; samples no scale answers count as {UNANSWERED_TOKENS} token. "
           "Scores in percent.", ""]
  for r in result["runs"]:
    scales = r["scales"]
    lines += [f"## {r['name']} (task `{r['task']}`)", "", f"Source: `{r['path']}`", ""]
    head = "| | " + " | ".join(str(s) for s in scales) + " | oracle | oracle tokens |"
    lines += [head, "|---" * (len(scales) + 3) + "|"]

    def row(label, ps, o):
      cells = [_fmt(ps[s]["score"]) if s in ps else "" for s in scales]
      return f"| {label} | " + " | ".join(cells) + f" | {_fmt(o['score'])} | {o['mean_tokens']:.2f} |"

    lines.append(row(f"**all** ({r['oracle']['count']})", r["per_scale"], r["oracle"]))
    for c, d in r["categories"].items():
      lines.append(row(f"{c} ({d['oracle']['count']})", d["per_scale"], d["oracle"]))
    o = r["oracle"]
    lines += ["", "Oracle scale histogram (tokens: samples): " +
              ", ".join(f"{k}: {v}" for k, v in o["histogram"].items()) + "."]
    if o["incomplete"]:
      lines.append(f"{o['incomplete']} sample(s) lack a prediction at some scale and are left out of the oracle.")
    lines.append("")
  lines += [f"![score vs visual tokens]({PLOT}.png) (also [PDF]({PLOT}.pdf), [SVG]({PLOT}.svg); bands: 95% "
            "bootstrap intervals over questions)", ""]
  return "\n".join(lines)


PLOT = "score_vs_tokens"
PLOT_FORMATS = ("png", "pdf", "svg")


def plot_score_vs_tokens(result: dict, out: str | pathlib.Path) -> list[pathlib.Path]:
  """Paper Figure 2 style: score (%) against visual tokens on a log axis, one panel per task. Per run: the overall
  score at each fixed scale (thick line) and one thinner dashed curve per category, each with its 95% bootstrap
  band over questions, and the oracle as a star (with its interval) in the overall curve's colour. Curves are
  named in a legend beside the panel, so no label overlaps another. Written as score_vs_tokens.png / .pdf / .svg
  (vector text in the PDF and SVG) into `out`; -> the paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks = list(dict.fromkeys(r["task"] for r in result["runs"]))
  colors = plt.get_cmap("tab10").colors
  with plt.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.4 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
      runs = [r for r in result["runs"] if r["task"] == task]
      ticks, k = set(), 0
      for r in runs:
        curves = [(r["name"], r["per_scale"], True)] + [(f"{r['name']}: {c}", d["per_scale"], False)
                                                        for c, d in r["categories"].items()]
        for label, ps, overall in curves:
          color = colors[k % len(colors)]
          k += 1
          xs = sorted(ps)
          ticks.update(xs)
          ys = [100 * ps[x]["score"] for x in xs]
          ax.fill_between(xs, [100 * ps[x]["ci"][0] for x in xs], [100 * ps[x]["ci"][1] for x in xs], color=color,
                          alpha=0.18 if overall else 0.08, linewidth=0)
          ax.plot(xs, ys, "o-" if overall else ".--", color=color, linewidth=2.2 if overall else 1.1,
                  label=f"{label} (all)" if overall and r["categories"] else label)
          if overall and r["oracle"]["count"]:
            o = r["oracle"]
            y, (lo, hi) = 100 * o["score"], o["ci"]
            ax.errorbar([o["mean_tokens"]], [y], yerr=[[y - 100 * lo], [100 * hi - y]], fmt="*", color=color,
                        markersize=15, markeredgecolor="black", capsize=3,
                        label=f"{r['name']} oracle: {y:.1f} at {o['mean_tokens']:.1f} tokens")
      ax.set_xscale("log")
      ticks = sorted(ticks)
      ax.set_xticks(ticks)
      ax.set_xticklabels([str(t) for t in ticks])
      ax.minorticks_off()
      ax.set_xlim(min(ticks) / 1.6, max(ticks) * 1.6)
      ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]), top=max(ax.get_ylim()[1], 100.0) + 2)
      ax.set_xlabel("# visual tokens")
      ax.set_ylabel("score (%)")
      ax.set_title(task)
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    fig.tight_layout()
    out = pathlib.Path(out)
    paths = [out / f"{PLOT}.{fmt}" for fmt in PLOT_FORMATS]
    for path in paths:
      fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
  return paths


def run_names(paths: list[str]) -> list[str]:
  """Label runs by task, adding the directory name where two runs share a task."""
  folders = [predictions.predictions_file(p).parent for p in paths]
  tasks = [_task(f) for f in folders]
  counts = collections.Counter(tasks)
  return [t if counts[t] == 1 else f.name for f, t in zip(folders, tasks)]


def write_report(paths: list[str], out: str | pathlib.Path, threshold: float = DEFAULT_THRESHOLD) -> dict:
  """Reads the runs, writes report.md, analysis.json and score_vs_tokens.png / .pdf / .svg into `out`; returns the
  result."""
  if not 0.0 <= threshold <= 1.0 or math.isnan(threshold):
    raise ValueError(f"--correct-threshold {threshold} is outside [0, 1] (per-sample scores are in [0, 1])")
  runs = [read_run(p, n) for p, n in zip(paths, run_names(paths))]
  result = analyze(runs, threshold)
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "report.md").write_text(report_markdown(result))
  (out / "analysis.json").write_text(json.dumps(result, indent=2))
  plot_score_vs_tokens(result, out)
  return result
