"""Granularity analysis of `m3 eval` runs: score per scale (per task and per question family), the oracle, a
markdown report and the paper's Figure-2-style plot (score against visual tokens).

Input: eval directories, each holding `predictions.jsonl` (one object per sample and scale, at least
`question_id`, `scale`, `prediction`, `score`; optionally `category`) and usually `summary.json` (its `task` names
the run). No JAX here: analysis runs anywhere.

Oracle (paper Sec. 4.2, Table 2): the mean over samples of the best score over scales, each sample at the smallest
scale that reaches its best (a sample no scale answers counts as 1 token). Beside it, named `oracle_threshold`: per
sample the smallest scale whose score >= `threshold` answers it, the fraction answered at any scale (the two agree
for exact-match scores; for soft metrics, VQA accuracy or ANLS, the threshold variant counts a 0.5 as fully right).
Samples that lack a prediction at some scale of their run are left out of the oracle (their scale is unknown) and
counted as `incomplete`. MMBench's circular rotations of a question are one sample, right only when every rotation
is (as `m3 eval`'s CircularEval accuracy).

Scale router (`--scale auto` lines): its accuracy and mean visual tokens t (routing pass included) beside the
fixed-scale frontier F(t), the linear interpolation between the two fixed scales adjacent to t (what a random
per-sample mix of them achieves), and the gap it closes, (A_auto - F(t)) / (O - F(t)), O the oracle. An eval folder
holding only auto lines (another router on the same samples) is put beside the run of the same task that covers
its samples.
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
CIRCULAR = {"mmbench": 1_000_000}  # task -> id modulus grouping a question's rotations (tasks/choice.py's ids)


@dataclasses.dataclass
class Run:
  """One eval directory: its task and its predictions keyed by (question_id, scale)."""
  name: str                                    # label in tables and plots
  task: str
  path: str
  scores: dict[str, dict[int, float]]          # question_id -> scale -> score
  categories: dict[str, str | None]            # question_id -> category
  # router runs: (label, {question_id: {"score", "tokens" (routing included), "chosen"}})
  autos: list[tuple[str, dict[str, dict]]] = dataclasses.field(default_factory=list)

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
  task = _task(file.parent)
  modulus = CIRCULAR.get(task)
  scores: dict[str, dict[int, float]] = collections.defaultdict(dict)
  auto: dict[str, dict] = {}
  categories: dict[str, str | None] = {}
  for (qid, scale), rec in predictions.latest(records).items():
    if rec["score"] is None:
      raise ValueError(f"{file}: score is null for question_id={qid!r} at scale {scale}; the task has no "
                       "per-sample score, so the oracle cannot be computed")
    # MMBench: a question (all its rotations) is right only when every rotation is: the min over its rows.
    key = str(int(qid) % modulus) if modulus else qid
    if scale is None:
      raise predictions.PredictionError(f"{file}: question_id={qid!r} has no scale; `m3 analyze` reads `m3 eval` "
                                        "output, whose every line has one")
    score = _number(file, qid, scale, rec, "score")
    if scale == predictions.AUTO:
      row = auto.setdefault(key, {"score": score, "tokens": [], "chosen": []})
      row["score"] = min(row["score"], score)
      row["tokens"].append(_number(file, qid, scale, rec, "visual_tokens"))
      row["chosen"].append(rec.get("chosen_scale"))
    else:
      scores[key][scale] = min(scores[key].get(scale, score), score)
    categories[key] = rec.get("category") or categories.get(key)
  for row in auto.values():  # a question's tokens: the mean over its rotations (one image each)
    row["tokens"] = sum(row["tokens"]) / len(row["tokens"])
  return Run(name=name or task, task=task, path=str(file.parent), scores=dict(scores), categories=categories,
             autos=[("auto", auto)] if auto else [])


def _number(file, qid: str, scale, rec: dict, field: str) -> float:
  try:
    return float(rec[field])
  except (KeyError, TypeError, ValueError):
    raise predictions.PredictionError(f"{file}: question_id={qid!r} at scale {scale}: {field} "
                                      f"{rec.get(field, '(missing)')!r} is not a number") from None


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


def best_oracle(run: Run, qids: Iterable[str] | None = None) -> dict:
  """The oracle: per sample the best score over scales, at the smallest scale that reaches it.

  Returns {"score": mean best score, "ci": its 95% bootstrap interval over questions, "mean_tokens", "count",
  "incomplete", "chosen": {question_id: tokens}, "histogram": {tokens: samples}}.
  """
  scales = sorted(run.scales)
  qids = list(run.scores) if qids is None else list(qids)
  chosen, best, incomplete = {}, [], 0
  for q in qids:
    per = run.scores[q]
    if any(s not in per for s in scales):
      incomplete += 1
      continue
    top = max(per[s] for s in scales)
    best.append(top)
    chosen[q] = next(s for s in scales if per[s] >= top) if top > 0 else UNANSWERED_TOKENS
  hist = collections.Counter(chosen.values())
  return {"score": mean(best) if best else float("nan"), "ci": list(bootstrap_ci(best)),
          "mean_tokens": mean(chosen.values()) if chosen else float("nan"), "count": len(chosen),
          "incomplete": incomplete, "chosen": chosen,
          "histogram": {int(k): hist[k] for k in sorted(hist, reverse=True)}}


def frontier(per_scale_score: dict[int, float], tokens: float) -> float:
  """F(t): the fixed-scale score at `tokens` visual tokens, linearly interpolated between the two adjacent fixed
  scales (a random per-sample mix of them spends t tokens on average); outside the scales, the nearest one's."""
  xs = sorted(per_scale_score)
  if tokens <= xs[0]:
    return per_scale_score[xs[0]]
  if tokens >= xs[-1]:
    return per_scale_score[xs[-1]]
  hi = next(x for x in xs if x >= tokens)
  lo = max(x for x in xs if x < tokens)
  w = (tokens - lo) / (hi - lo)
  return (1 - w) * per_scale_score[lo] + w * per_scale_score[hi]


def gap_closed(auto_score: float, frontier_score: float, oracle_score: float) -> float:
  """(A_auto - F(t)) / (O - F(t)): 0 at the fixed-scale frontier, 1 at the oracle (nan when O == F(t))."""
  gap = oracle_score - frontier_score
  return (auto_score - frontier_score) / gap if gap > 0 else float("nan")


def auto_row(run: Run, label: str, auto: dict[str, dict]) -> dict:
  """A router run against the fixed scales and the oracle on the same samples (those complete at every scale)."""
  o = best_oracle(run, [q for q in auto if q in run.scores])
  qids = list(o["chosen"])
  scores = [auto[q]["score"] for q in qids]
  tokens = mean(auto[q]["tokens"] for q in qids) if qids else float("nan")
  fixed = {s: v["score"] for s, v in per_scale(run, qids).items()}
  a = mean(scores) if qids else float("nan")
  f = frontier(fixed, tokens) if qids else float("nan")
  chosen = collections.Counter(c for q in qids for c in auto[q]["chosen"])
  return {"name": label, "score": a, "ci": list(bootstrap_ci(scores)), "mean_tokens": tokens, "count": len(qids),
          "frontier": f, "oracle": o["score"], "oracle_tokens": o["mean_tokens"],
          "gap_closed": gap_closed(a, f, o["score"]),
          "chosen": {str(k): chosen[k] for k in sorted(chosen, key=lambda c: -1 if c is None else c, reverse=True)}}


def oracle(run: Run, threshold: float = DEFAULT_THRESHOLD, qids: Iterable[str] | None = None) -> dict:
  """The threshold oracle: the per-sample cheapest answering scale (score >= threshold).

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
      o, t = best_oracle(run, qids), oracle(run, threshold, qids)
      by_cat[c] = {"per_scale": per_scale(run, qids),
                   "oracle": {k: o[k] for k in ("score", "ci", "mean_tokens", "count")},
                   "oracle_threshold": {k: t[k] for k in ("score", "ci", "mean_tokens", "count")}}
    o, t = best_oracle(run), oracle(run, threshold)
    out["runs"].append({
        "name": run.name, "task": run.task, "path": run.path, "scales": run.scales,
        "per_scale": per_scale(run),
        "oracle": {k: v for k, v in o.items() if k != "chosen"},
        "oracle_threshold": {k: v for k, v in t.items() if k != "chosen"},
        "categories": by_cat,
        "auto": [auto_row(run, label, auto) for label, auto in run.autos],
    })
  return out


def attach_autos(runs: list[Run]) -> list[Run]:
  """Folders holding only router (auto) lines join the run of the same task whose samples cover theirs."""
  hosts = [r for r in runs if r.scores]
  for r in runs:
    if r.scores:
      continue
    for label, auto in r.autos:
      host = next((h for h in hosts if h.task == r.task and set(auto) <= set(h.scores)), None)
      if host is None:
        raise ValueError(f"{r.path} holds only --scale auto predictions and no run of task {r.task!r} given with "
                         "it has fixed-scale predictions for all its samples; pass that run's folder too")
      host.autos.append((f"auto ({r.name})", auto))
  return hosts


def _fmt(x: float) -> str:
  return "nan" if x != x else f"{100 * x:.1f}"


def report_markdown(result: dict) -> str:
  """Scores are shown in percent; tokens are visual tokens per image (per grid for NeXT)."""
  lines = ["# M3 granularity report", "",
           "Oracle: per sample the best score over scales, at the smallest scale reaching it; samples no scale "
           f"answers count as {UNANSWERED_TOKENS} token. Oracle >= {result['threshold']}: per sample the smallest "
           f"scale whose score >= {result['threshold']} (the fraction so answered). Scores in percent.", ""]
  for r in result["runs"]:
    scales = r["scales"]
    lines += [f"## {r['name']} (task `{r['task']}`)", "", f"Source: `{r['path']}`", ""]
    th = result["threshold"]
    head = ("| | " + " | ".join(str(s) for s in scales) +
            f" | oracle | oracle tokens | oracle >= {th} | its tokens |")
    lines += [head, "|---" * (len(scales) + 5) + "|"]

    def row(label, ps, o, t):
      cells = [_fmt(ps[s]["score"]) if s in ps else "" for s in scales]
      return (f"| {label} | " + " | ".join(cells) + f" | {_fmt(o['score'])} | {o['mean_tokens']:.2f} | "
              f"{_fmt(t['score'])} | {t['mean_tokens']:.2f} |")

    lines.append(row(f"**all** ({r['oracle']['count']})", r["per_scale"], r["oracle"], r["oracle_threshold"]))
    for c, d in r["categories"].items():
      lines.append(row(f"{c} ({d['oracle']['count']})", d["per_scale"], d["oracle"], d["oracle_threshold"]))
    if r.get("auto"):
      lines += ["", "Scale router (`--scale auto`): mean visual tokens t include the routing pass; F(t) is the "
                "fixed-scale frontier at t (linear between the adjacent scales); gap closed = (auto - F(t)) / "
                "(oracle - F(t)), on the samples each router answered.", "",
                "| router | samples | accuracy | 95% CI | mean visual tokens | F(t) | auto - F(t) | oracle | "
                "gap closed | chosen scales |", "|---" * 10 + "|"]
      for a in r["auto"]:
        lo, hi = a["ci"]
        lines.append(f"| {a['name']} | {a['count']} | {_fmt(a['score'])} | {_fmt(lo)}-{_fmt(hi)} | "
                     f"{a['mean_tokens']:.2f} | {_fmt(a['frontier'])} | {_fmt(a['score'] - a['frontier'])} | "
                     f"{_fmt(a['oracle'])} | {_fmt(a['gap_closed'])}% | "
                     + ", ".join(f"{k}: {v}" for k, v in a["chosen"].items()) + " |")
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
  import logging
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  # The PDF backend's font subsetting logs each table it touches at INFO (70 lines under `m3 demo`'s INFO logging).
  logging.getLogger("fontTools").setLevel(logging.WARNING)

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
            for a, marker in zip(r.get("auto", []), "DPXv^<>"):  # each router run: its point and interval
              y, (lo, hi) = 100 * a["score"], a["ci"]
              ax.errorbar([a["mean_tokens"]], [y], yerr=[[y - 100 * lo], [100 * hi - y]], fmt=marker, color=color,
                          markersize=9, markeredgecolor="black", capsize=3,
                          label=f"{r['name']} {a['name']}: {y:.1f} at {a['mean_tokens']:.1f} tokens")
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
  runs = attach_autos([read_run(p, n) for p, n in zip(paths, run_names(paths))])
  result = analyze(runs, threshold)
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "report.md").write_text(report_markdown(result))
  (out / "analysis.json").write_text(json.dumps(result, indent=2))
  plot_score_vs_tokens(result, out)
  return result
