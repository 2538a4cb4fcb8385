"""Runs every benchmark and collects their tables in benchmarks/results.md (`make bench`, `make bench QUICK=1`).

    python -m benchmarks.run_all [--quick] [--only train_step,data_pipeline] [--out benchmarks/results.md]

Each benchmark runs as its own subprocess (`python -m benchmarks.NAME ...`, its own JAX runtime and memory), in
turn, so they do not compete for the cores. results.md records the machine, the package versions, the load average
before each run (a loaded machine explains a slow number), and per benchmark its command, wall time and the
markdown tables it printed. `--quick` (or QUICK=1 in the environment) runs reduced sizes that finish in minutes:
numbers for a smoke check, not for the README.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "torch", "numpy")


def benchmarks(work: pathlib.Path, quick: bool) -> dict[str, list[str]]:
  """name -> its arguments; quick: reduced sizes. Benchmarks that write a .md of their own write it into `work`
  (the committed benchmarks/*.md are the measured records the README quotes)."""
  if quick:
    return {
        "train_step": ["--config", "tiny", "--batch", "2", "--steps", "2", "--text-tokens", "16"],
        "data_pipeline": ["--workers", "0", "--batches", "3", "--images", "16"],
        "probe_pooled_pixels": ["--train", "200", "--test", "50"],
        "generate_speed": ["--configs", "tiny", "--batch", "2", "--new-tokens", "4", "--repeats", "1",
                           "--torch-threads", "1", "--out", str(work / "generate_speed.md")],
    }
  return {
      "train_step": ["--config", "small", "--steps", "3"],
      "data_pipeline": [],
      "probe_pooled_pixels": [],
      "generate_speed": ["--out", str(work / "generate_speed.md")],
      "convert_memory": ["--workdir", str(work / "convert_memory"), "--out", str(work / "convert_memory.md")],
      "probe_learnability": ["--workdir", str(work / "probe_learnability"), "--steps", "900"],
      "paper_findings": ["--workdir", str(work / "paper_findings"), "--no-progress"],
      "profile_train_step": ["--config", "small", "--repeats", "2"],
      "eval_scales": ["--repeats", "3"],
      "startup": ["--rounds", "1", "--out", str(work / "startup.md")],
      "serve_load": ["--out", str(work / "serve_load.md")],
      "next_train": ["--config", "small:next"],
      "next_staircase": ["--workdir", str(work / "next_staircase")],
  }


def machine() -> list[str]:
  jax_devices = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].device_kind, "
                                "jax.device_count())"], capture_output=True, text=True, cwd=REPO).stdout.strip()
  versions = []
  for name in PACKAGES:
    try:
      versions.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
      pass
  return [f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
          f"- JAX devices: {jax_devices or 'unknown'}",
          f"- Python {platform.python_version()}; {', '.join(versions)}",
          f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"]


def tables(stdout: str) -> str:
  """The markdown table lines of a benchmark's output, with the line above each table (its caption)."""
  lines, out = stdout.splitlines(), []
  for i, line in enumerate(lines):
    if line.startswith("|"):
      if not out or not out[-1].startswith("|"):
        caption = lines[i - 1].strip() if i and not lines[i - 1].startswith("|") else ""
        out += ["", caption] if caption else [""]
      out.append(line)
  return "\n".join(out).strip()


def run_one(name: str, args: list[str]) -> tuple[str, int]:
  """Runs benchmarks.NAME; returns its results.md section and exit status."""
  cmd = [sys.executable, "-m", f"benchmarks.{name}", *args]
  load = " ".join(f"{x:.2f}" for x in os.getloadavg())
  print(f"[run_all] {name}: {' '.join(cmd[1:])}", flush=True)
  start = time.perf_counter()
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  secs = time.perf_counter() - start
  body = tables(out.stdout) or f"```\n{out.stdout.strip()[-2000:]}\n```"
  if out.returncode:
    body += f"\n\nFAILED (exit {out.returncode}):\n```\n{out.stderr.strip()[-2000:]}\n```"
  section = (f"## {name}\n\n`python {' '.join(cmd[1:])}` ({secs:.0f} s; load average before: {load})\n\n"
             f"{body}\n")
  print(section, flush=True)
  return section, out.returncode


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", default=bool(os.environ.get("QUICK")),
                 help="reduced sizes, minutes in all (default: on when QUICK is set in the environment)")
  p.add_argument("--only", default="", help="comma list of benchmark names to run (default: all)")
  p.add_argument("--out", default=str(REPO / "benchmarks" / "results.md"), help="the collected results")
  p.add_argument("--workdir", default=None, help="scratch folder for the benchmarks' own files (default: a temp dir)")
  args = p.parse_args(argv)
  work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="m3_bench_"))
  work.mkdir(parents=True, exist_ok=True)
  todo = benchmarks(work, args.quick)
  if args.only:
    unknown = sorted(set(args.only.split(",")) - set(todo))
    if unknown:
      p.error(f"--only {unknown}: not benchmarks; expected any of {', '.join(todo)}")
    todo = {k: v for k, v in todo.items() if k in args.only.split(",")}
  sections, failed = [], []
  for name, bench_args in todo.items():
    section, code = run_one(name, bench_args)
    sections.append(section)
    if code:
      failed.append(name)
  mode = "quick: reduced sizes, a smoke check" if args.quick else "full"
  text = "\n".join([f"# Benchmark results ({mode})", "", *machine(), "", *sections])
  pathlib.Path(args.out).write_text(text)
  print(f"[run_all] wrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
