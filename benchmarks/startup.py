"""Start-up time with JAX's persistent compilation cache (m3_jax/compile_cache.py): the first start of a command
(an empty cache: every XLA program compiles) against the second (the same command, programs read from the cache).

    python -m benchmarks.startup [--rounds 2] [--config.KEY=VALUE ...] [--out FILE.md]

Two commands, each a fresh process, as a user types them:
  m3 train --config tiny --config.train.num_steps=2 ...   (a new workdir each start: the same programs compile)
  m3 generate --ckpt WORKDIR --image IMG --prompt ... --scale 9   (the run trained in the first round)
Rounds interleave first and second starts (first, second, first, second, ...) so that a change in load affects
both; the load average is printed beside each timing. `--config.KEY=VALUE` overrides go to `m3 train`.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
# The tiny config trimmed so that a start is mostly compilation: 2 steps of a 4-example batch on a 16-example probe.
TRAIN = ["--config.train.num_steps=2", "--config.train.batch_size=4", "--config.data.probe_size=16",
         "--config.checkpoint.every=2"]


def timed(cmd: list[str], cache: pathlib.Path) -> float:
  env = dict(os.environ, M3_COMPILATION_CACHE=str(cache), JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  began = time.perf_counter()
  done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
  seconds = time.perf_counter() - began
  if done.returncode != 0:
    raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
  return seconds


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  overrides = [a for a in argv if a.startswith("--config.")]
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=2, help="first/second start pairs per command (default 2)")
  parser.add_argument("--out", default=None, help="also write the table to this markdown file")
  args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
  m3 = [sys.executable, "-m", "m3_jax"]
  with tempfile.TemporaryDirectory(prefix="m3_startup_") as tmp:
    tmp = pathlib.Path(tmp)
    from PIL import Image
    Image.new("RGB", (48, 48), (200, 30, 30)).save(tmp / "red.png")
    commands = {
        "m3 train (tiny, 2 steps)": lambda r, k: [*m3, "train", "--config", "tiny", "--workdir",
                                                  str(tmp / f"run_{r}_{k}"), "--no-progress", *TRAIN, *overrides],
        "m3 generate (tiny)": lambda r, k: [*m3, "generate", "--ckpt", str(tmp / "run_0_first"), "--image",
                                            str(tmp / "red.png"), "--prompt", "What colour is the square?",
                                            "--scale", "9", "--max-new-tokens", "4"],
    }
    rows: dict[str, dict[str, list[tuple[float, float]]]] = {c: {"first": [], "second": []} for c in commands}
    for r in range(args.rounds):
      for i, (name, command) in enumerate(commands.items()):
        cache = tmp / f"cache_{r}_{i}"   # empty for the first start, filled by it for the second
        for kind in ("first", "second"):
          load = os.getloadavg()[0]
          seconds = timed(command(r, kind), cache)
          rows[name][kind].append((seconds, load))
          print(f"round {r + 1}: {name}, {kind} start: {seconds:.1f} s (load {load:.2f}), cache "
                f"{len(os.listdir(cache))} entries", flush=True)
  lines = ["| command | first start (s) | second start (s) | second / first | load avg (1 min) |",
           "|---|---|---|---|---|"]
  for name, kinds in rows.items():
    first = statistics.median(s for s, _ in kinds["first"])
    second = statistics.median(s for s, _ in kinds["second"])
    loads = [l for k in kinds.values() for _, l in k]
    lines.append(f"| {name} | {first:.1f} | {second:.1f} | {second / first:.2f} | "
                 f"{min(loads):.2f}-{max(loads):.2f} |")
  table = "\n".join(lines)
  print(f"\nmedians over {args.rounds} rounds, {os.cpu_count()} CPUs\n\n{table}")
  if args.out:
    pathlib.Path(args.out).write_text(f"# Start-up with the persistent compilation cache\n\n{table}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
