"""The scale router (`--scale auto`): policy, calibration, the frontier and gap on hand-worked numbers; fitting from
eval folders, save / load, batch independence and every refusal on a tiny random checkpoint."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from m3_jax import cli
from m3_jax.checkpoint import m3dir, reader
from m3_jax.configs import base as m3_config
from m3_jax.data import probe
from m3_jax.data.tokenizer import probe_tokenizer
from m3_jax.eval import analysis, cache, predictions
from m3_jax.eval.loader import load
from m3_jax.eval.router import fit as fit_lib, policy, store
from m3_jax.eval.tasks import get_task
from m3_jax.models import llava
from m3_jax.models.config import ModelConfig

SCALES = (1, 9, 36, 144)


# ------------------------------------------------------------------------------------------ policy, calibration
def test_policy_picks_the_smallest_scale_over_the_threshold():
  probs = np.array([[0.9, 0.9, 0.9, 0.9],    # 1 clears 0.5
                    [0.2, 0.6, 0.7, 0.8],    # 9
                    [0.1, 0.2, 0.3, 0.55],   # 144
                    [0.1, 0.2, 0.3, 0.4]])   # none clears: the largest
  assert policy.choose(probs, SCALES, 0.5).tolist() == [1, 9, 144, 144]
  assert policy.choose(probs, SCALES, 0.0).tolist() == [1, 1, 1, 1]
  assert policy.choose(probs, SCALES, 1.01).tolist() == [144, 144, 144, 144]
  # a cap (serve's max_visual_tokens) limits the choice: row 2 would take 144, capped at 36 it takes 36
  assert policy.choose(probs, SCALES, 0.5, caps=[None, 9, 36, 1]).tolist() == [1, 9, 36, 1]


def test_calibration_table_default_and_budget_hand_worked():
  # two samples: a needs 9 (right at 9 and above), b needs 144
  scores = np.array([[0, 1, 1, 1], [0, 0, 0, 1]], float)
  probs = np.array([[0.1, 0.8, 0.9, 0.95], [0.1, 0.3, 0.6, 0.9]])
  rows = {r["threshold"]: r for r in policy.table(probs, scores, SCALES, routing_tokens=1, thresholds=(0.0, 0.5,
                                                                                                       0.7, 1.01))}
  assert rows[0.0] == {"threshold": 0.0, "accuracy": 0.0, "mean_tokens": 1 + 1}       # both at 1
  assert rows[0.5] == {"threshold": 0.5, "accuracy": 0.5, "mean_tokens": (9 + 36) / 2 + 1}   # a: 9, b: 36
  assert rows[0.7] == {"threshold": 0.7, "accuracy": 1.0, "mean_tokens": (9 + 144) / 2 + 1}  # a: 9, b: 144
  assert rows[1.01] == {"threshold": 1.01, "accuracy": 1.0, "mean_tokens": 144 + 1}
  table = list(rows.values())
  # the default is the cheapest row that reaches its target; none reaches 1.1: the most accurate, cheapest
  assert policy.default_threshold(table, target=1.0)["threshold"] == 0.7
  assert policy.default_threshold(table, target=0.5)["threshold"] == 0.5
  assert policy.default_threshold(table, target=1.1)["threshold"] == 0.7
  # a budget is respected on the calibration split: the most accurate row within it
  assert policy.budget_threshold(table, 80)["threshold"] == 0.7
  assert policy.budget_threshold(table, 30)["threshold"] == 0.5
  assert policy.budget_threshold(table, 2)["threshold"] == 0.0
  with pytest.raises(ValueError, match="--budget 1: no threshold keeps the mean visual tokens within it .* the "
                                       "fewest is 2.00"):
    policy.budget_threshold(table, 1)


def test_frontier_and_gap_closed_hand_worked():
  fixed = {1: 0.30, 9: 0.50, 36: 0.60, 144: 0.70}
  assert analysis.frontier(fixed, 20.0) == pytest.approx(0.50 + (20 - 9) / (36 - 9) * 0.10)  # 0.54074
  assert analysis.frontier(fixed, 90.0) == pytest.approx(0.65)  # half-way between 36 and 144
  assert analysis.frontier(fixed, 9.0) == pytest.approx(0.50)
  assert analysis.frontier(fixed, 0.5) == 0.30 and analysis.frontier(fixed, 600) == 0.70
  # auto 0.62 at 20 tokens, oracle 0.80: (0.62 - 0.540741) / (0.80 - 0.540741) = 0.305714
  assert analysis.gap_closed(0.62, analysis.frontier(fixed, 20.0), 0.80) == pytest.approx(0.3057143, abs=1e-6)
  assert np.isnan(analysis.gap_closed(0.5, 0.6, 0.6))


def _write_eval(folder, rows, task="probe", auto=None):
  folder.mkdir(parents=True)
  lines = [predictions.record(q, s, "x", v, category=c) for q, (c, per) in rows.items() for s, v in per.items()]
  for q, (v, tokens, chosen) in (auto or {}).items():
    lines.append(predictions.record(q, "auto", "x", v, category=rows[q][0] if q in rows else None,
                                    visual_tokens=tokens, chosen_scale=chosen))
  predictions.write(folder / predictions.PREDICTIONS, lines)
  (folder / "summary.json").write_text(json.dumps({"task": task}))
  return folder


def test_analysis_puts_auto_runs_beside_the_frontier(tmp_path):
  rows = {"q1": ("a", {1: 1, 9: 1, 36: 1, 144: 1}), "q2": ("b", {1: 0, 9: 1, 36: 1, 144: 1}),
          "q3": ("b", {1: 0, 9: 0, 36: 0, 144: 1}), "q4": ("a", {1: 0, 9: 0, 36: 0, 144: 0})}
  # the router: q1 at 1, q2 at 9, q3 at 36 (wrong), q4 at 1; +1 routing token each
  auto = {"q1": (1, 2, 1), "q2": (1, 10, 9), "q3": (0, 37, 36), "q4": (0, 2, 1)}
  a = _write_eval(tmp_path / "run", rows, auto=auto)
  other = _write_eval(tmp_path / "text_only", {}, auto={q: (1 if q == "q1" else 0, 145, 144) for q in rows})
  result = analysis.write_report([str(a), str(other)], tmp_path / "out")
  (r,) = result["runs"]
  mine, baseline = r["auto"]
  # fixed: 1 -> 0.25, 9 -> 0.5, 36 -> 0.5, 144 -> 0.75; oracle 0.75; auto 0.5 at 51/4 = 12.75 tokens
  assert mine["name"] == "auto" and mine["score"] == 0.5 and mine["mean_tokens"] == 12.75
  assert mine["frontier"] == pytest.approx(0.5) and mine["oracle"] == 0.75
  assert mine["gap_closed"] == pytest.approx(0.0)
  assert mine["chosen"] == {"36": 1, "9": 1, "1": 2}
  assert baseline["name"] == "auto (text_only)" and baseline["score"] == 0.25 and baseline["frontier"] == 0.75
  assert np.isnan(baseline["gap_closed"])  # at 145 tokens the frontier is 144's 0.75, the oracle's: no gap
  md = (tmp_path / "out" / "report.md").read_text()
  assert "| auto | 4 | 50.0 | " in md and "| 12.75 | 50.0 | 0.0 | 75.0 | 0.0% |" in md
  assert "run auto: 50.0 at 12.8 tokens" in (tmp_path / "out" / "score_vs_tokens.svg").read_text()


def test_oracle_of_soft_scores_and_mmbench_rotations(tmp_path):
  soft = {"q1": (None, {1: 0.3, 9: 0.6, 36: 0.6, 144: 1.0}), "q2": (None, {1: 0.4, 9: 0.3, 36: 0.3, 144: 0.3})}
  run = analysis.read_run(_write_eval(tmp_path / "vqa", soft, task="textvqa"))
  best = analysis.best_oracle(run)
  assert best["score"] == pytest.approx((1.0 + 0.4) / 2) and best["chosen"] == {"q1": 144, "q2": 1}
  assert analysis.oracle(run)["score"] == pytest.approx(0.5)  # >= 0.5 counts q1 as fully right, q2 not at all
  # MMBench: rotations 7, 1000007, 2000007 are one question, right only when every rotation is (CircularEval)
  rot = {"7": ("x", {1: 1, 9: 1}), "1000007": ("x", {1: 0, 9: 1}), "2000007": ("x", {1: 1, 9: 1}),
         "8": ("x", {1: 1, 9: 0}), "1000008": ("x", {1: 1, 9: 1})}
  run = analysis.read_run(_write_eval(tmp_path / "mmb", rot, task="mmbench"))
  assert run.scores == {"7": {1: 0.0, 9: 1.0}, "8": {1: 1.0, 9: 0.0}}
  assert analysis.best_oracle(run)["chosen"] == {"7": 9, "8": 1}


# ------------------------------------------------------------------------------------- a tiny random checkpoint
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A random tiny checkpoint, a probe (seed 4), and eval folders of the validation split whose scores follow the
  probe's design (a sample is answered from the scale its family needs), written as `m3 eval` writes them."""
  root = tmp_path_factory.mktemp("router")
  cfg = ModelConfig.from_config(m3_config.load("configs/tiny.py").model)
  ckpt = m3dir.save(root / "m3", cfg, llava.init_params(cfg, jax.random.key(0)), tokenizer_src=probe_tokenizer(),
                    template="plain")
  data = root / "probe"
  probe.build(str(data), seed=4, sizes=dict(train=1, validation=24, test=8))
  identity = reader.identity(ckpt)
  run_dir = write_calibration(root / "val", data, identity)
  assert cli.main(["router", "fit", "--ckpt", str(ckpt), "--runs", str(run_dir), "--features", "joint"]) == 0
  return {"root": root, "ckpt": ckpt, "data": data, "identity": identity, "val": run_dir}


def write_calibration(folder, data, identity, scales=SCALES, drop=()):
  task = get_task("probe", split="validation")
  fp = cache.Fingerprint(data)
  samples = list(fp.feed(task.samples(str(data))))
  run = cache.run_record(ckpt="m3", step=None, data=str(data), ckpt_identity=identity, task="probe",
                         task_options={"split": "validation"}, data_fingerprint=fp.hexdigest(), template="plain",
                         pool="avg", grid=None, max_new_tokens=4, temperature=0.0, top_p=1.0, seed=0,
                         likelihood=False)
  cache.open_run(folder, run)
  lines = [predictions.record(s.question_id, scale, "x", float(scale >= s.meta["needed_scale"]),
                              category=s.category) for s in samples for scale in scales
           if (s.question_id, scale) not in drop]
  predictions.write(folder / predictions.PREDICTIONS, lines)
  return folder


def test_fit_save_load_same_choices_and_batch_independent(setup, tmp_path):
  folder = setup["ckpt"] / "router"
  meta = json.loads((folder / "router.json").read_text())
  assert meta["ckpt_identity"] == setup["identity"] and meta["scales"] == [1, 9, 36, 144]
  assert meta["features"] == "joint" and meta["routing_tokens"] == 1
  assert meta["calibration"]["fixed"] == {"1": 0.25, "9": 0.5, "36": 0.75, "144": 1.0}
  assert meta["calibration"]["oracle"] == {"score": 1.0, "mean_tokens": (1 + 9 + 36 + 144) / 4}
  assert meta["label"] == "score >= 0.5 (exact match)" and len(meta["calibration"]["table"]) == 102
  model = load(setup["ckpt"])  # m3_jax.load attaches the checkpoint's router
  samples = list(get_task("probe").samples(str(setup["data"])))
  images, prompts = [s.image_bytes for s in samples], [s.prompt for s in samples]
  together = model.generate(images, prompts, scale="auto", max_new_tokens=2)
  alone = [model.generate(im, p, scale="auto", max_new_tokens=2) for im, p in zip(images[:3], prompts[:3])]
  mixed = model.generate(images[2::-1] + [None], prompts[2::-1] + ["hi"], scale="auto", max_new_tokens=2)
  strip = lambda r: {k: v for k, v in r.items() if not k.endswith("seconds")}  # noqa: E731
  assert [strip(r) for r in alone] == [strip(r) for r in together[:3]] == [strip(r) for r in mixed[2::-1]]
  assert mixed[-1]["chosen_scale"] is None and mixed[-1]["visual_tokens"] == 0
  for r in together:
    assert r["scale"] == "auto" and r["chosen_scale"] in SCALES
    assert r["visual_tokens"] == r["chosen_scale"] + 1 and r["routing_visual_tokens"] == 1
  fixed = model.generate(images, prompts, scale=[r["chosen_scale"] for r in together], max_new_tokens=2)
  assert [r["token_ids"] for r in fixed] == [r["token_ids"] for r in together]  # the answer at the chosen scale
  # saved and loaded elsewhere: the same choices and the same identity
  copy = store.save(store.load(folder), tmp_path / "copy")
  again = load(setup["ckpt"], router=copy)
  assert again.router.identity == model.router.identity
  assert again.route(images, prompts) == [r["chosen_scale"] for r in together]
  # a budget picks the calibration table's best within it
  cheap = model.route(images, prompts, budget=2)
  assert cheap == [1] * len(images)


def test_auto_features_keep_the_kind_that_routes_best_out_of_fold(setup, monkeypatch):
  """--features auto (the default): every kind is fitted and assessed out of fold; planted features where only
  "image" tells the family (the scale a sample needs) and the others are noise make "image" the kept kind."""
  from m3_jax.eval.router import features as features_lib
  rng = np.random.default_rng(0)
  samples = list(get_task("probe", split="validation").samples(str(setup["data"])))
  needed = np.array([SCALES.index(s.meta["needed_scale"]) for s in samples])

  def planted(model, kind, scale, pixels, ids, batch_size=16):
    assert len(ids) == len(samples)
    noise = rng.normal(size=(len(ids), 8))
    return np.concatenate([np.eye(4)[needed] * 3, noise], 1) if kind == "image" else noise

  monkeypatch.setattr(features_lib, "features", planted)
  router = fit_lib.fit(load(setup["ckpt"]), setup["identity"], [str(setup["val"])])
  sel = router.meta["selection"]
  assert router.kind == "image" and router.meta["routing_tokens"] == 1 and set(sel) == {"joint", "image", "text"}
  # Routed by family, every calibration sample is answered (the default row must match the best fixed scale, 144,
  # which answers all) with fewer tokens than 144; the fixed scales answer 1/4, 2/4, 3/4, 4/4 of the samples, so
  # the frontier between 36 and 144 tokens is 0.75 + 0.25 * (t - 36) / 108.
  t = sel["image"]["mean_tokens"]
  assert sel["image"]["accuracy"] == 1.0 and 48.5 <= t < 100
  assert sel["image"]["gain"] == pytest.approx(1.0 - (0.75 + 0.25 * (t - 36) / 108))
  assert max(sel["joint"]["gain"], sel["text"]["gain"]) < sel["image"]["gain"] - 0.05
  assert router.meta["calibration"]["default"] == {k: v for k, v in sel["image"].items() if k != "gain"}


def test_refusals_name_what_is_wrong(setup, tmp_path, capsys):
  ckpt, data = setup["ckpt"], setup["data"]
  cfg = ModelConfig.from_config(m3_config.load("configs/tiny.py").model)
  bare = m3dir.save(tmp_path / "bare", cfg, llava.init_params(cfg, jax.random.key(1)),
                    tokenizer_src=probe_tokenizer(), template="plain")
  # --scale auto without a router: says how to fit one
  code = cli.main(["eval", "--ckpt", str(bare), "--task", "probe", "--data", str(data), "--scale", "auto",
                   "--out", str(tmp_path / "e")])
  err = capsys.readouterr().err
  assert code == 2
  assert f"{bare} has no scale router; fit one with `m3 router fit --ckpt {bare} --runs EVALDIR...`" in err
  assert cli.main(["generate", "--ckpt", str(bare), "--prompt", "hi", "--scale", "auto"]) == 2
  assert f"{bare} has no scale router; fit one with `m3 router fit" in capsys.readouterr().err
  with pytest.raises(ValueError, match="has no scale router; fit one with `m3 router fit"):
    load(bare).generate(None, "hi", scale="auto")
  # a router of another checkpoint: refused naming both identities
  other = store.load(ckpt / "router")
  store.save(other, tmp_path / "r")
  with pytest.raises(store.RouterMismatch, match=f"was fitted for checkpoint {setup['identity']}, not {bare} "
                                                 f"\\({reader.identity(bare)}\\)"):
    load(bare, router=tmp_path / "r")
  # a router for other scales: refused naming both chains
  other.meta = {**other.meta, "ckpt_identity": reader.identity(bare), "scales": [1, 9, 36, 144, 576]}
  store.save(other, tmp_path / "r576")
  with pytest.raises(store.RouterMismatch, match=r"chooses among scales \[576, 144, 36, 9, 1\], but .* has "
                                                 r"\[144, 36, 9, 1\] \(no \[576\]\)"):
    load(bare, router=tmp_path / "r576")
  # calibration runs: another checkpoint's, a missing scale, different sample ids
  with pytest.raises(fit_lib.CalibrationError, match=f"evaluated checkpoint {setup['identity']}, not {bare}"):
    fit_lib.read_calibration(setup["val"], SCALES, reader.identity(bare), str(bare))
  no9 = write_calibration(tmp_path / "no9", data, setup["identity"], scales=(1, 36, 144))
  with pytest.raises(fit_lib.CalibrationError, match=r"no9 lacks scale\(s\) \[9\] \(it has \[144, 36, 1\]\)"):
    fit_lib.read_calibration(no9, SCALES, setup["identity"], str(ckpt))
  holes = write_calibration(tmp_path / "holes", data, setup["identity"],
                            drop={("validation-3", 36), ("validation-5", 36)})
  assert cli.main(["router", "fit", "--ckpt", str(ckpt), "--runs", str(holes), "--out", str(tmp_path / "x")]) == 2
  assert ("scales 1 and 36 have different sample ids (2 only at 1: validation-3, validation-5; 0 only at 36: )"
          in capsys.readouterr().err)



def test_serve_answers_auto_with_the_checkpoints_router(setup):
  import base64
  from fastapi.testclient import TestClient
  from m3_jax.serve import chat
  from m3_jax.serve.app import create_app
  model = load(setup["ckpt"])
  samples = list(get_task("probe").samples(str(setup["data"])))[:2]
  with TestClient(create_app(model, name="m")) as client:
    got = [client.post("/v1/chat/completions", json={
        "model": "m", "max_tokens": 2, "visual_tokens": "auto", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," +
                                                       base64.b64encode(s.image_bytes).decode()}},
            {"type": "text", "text": s.prompt}]}]}) for s in samples]
  assert [r.status_code for r in got] == [200, 200]
  ids = [chat.prompt_ids(model, None, [(0, s.prompt)], True) for s in samples]
  expected = model.router.choose(model, model.pixels([s.image_bytes for s in samples]), ids)
  assert [r.json()["scale"] for r in got] == expected


def test_a_calibration_run_made_with_a_relative_data_path_is_read_from_any_directory(setup, tmp_path, monkeypatch):
  """run.json keeps --data absolute (and the run's --allow-outside-images): `m3 router fit` run from another
  directory reads the samples of a run evaluated with `--data probe`."""
  monkeypatch.chdir(setup["data"].parent)
  run_dir = write_calibration(tmp_path / "relative", type(setup["data"])(setup["data"].name), setup["identity"])
  run = json.loads((run_dir / "run.json").read_text())
  assert run["data"] == str(setup["data"]) and run["allow_outside_images"] is False
  monkeypatch.chdir(tmp_path)
  run, scores = fit_lib.read_calibration(run_dir, SCALES, setup["identity"], "m3")
  assert len(fit_lib.calibration_samples(run_dir, run, set(scores))) == 24
