"""Evaluation of M3 checkpoints at every scale.

  generate.py     Engine: jitted batched generation and log-likelihood scoring with a visual-token scale per sample
  loader.py       M3Model (`m3_jax.load`): a checkpoint with its tokenizer, image preprocessing and chat template;
                  `generate` answers (image, prompt) pairs, `choose` picks an option letter by likelihood
  evaluator.py    a task at several scales through answer functions -> predictions.jsonl and the summary (`m3 eval`)
  predictions.py  the eval output files: predictions.jsonl, summary.json, summary.csv
  scoring.py      a predictions file from any model against a task's samples (`m3 score`)
  analysis.py     per-scale / per-category scores, the oracle, report and plot (`m3 analyze`)
  metrics.py      the official benchmark metrics
  tasks/          the benchmarks: readers of their published files and per-sample scores
"""
