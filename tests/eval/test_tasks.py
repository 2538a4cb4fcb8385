"""Each benchmark reader on small files written in its publisher's format; scores and summaries on hand-worked
predictions; malformed files are errors that name the line or record."""
from __future__ import annotations

import base64
import csv
import json
import os

import pytest

from m3_jax.eval.tasks import TASKS, UnknownTaskError, get_task, task_names
from m3_jax.eval.tasks.base import Sample, Task
from m3_jax.eval.tasks.common import TaskDataError


def write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)
  return str(path)


def write_lines(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def write_table(path, header, rows, delimiter):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", newline="") as f:
    w = csv.writer(f, delimiter=delimiter)
    w.writerow(header)
    w.writerows(rows)
  return str(path)


def run(task, path, preds):
  samples = list(task.samples(path))
  return samples, task.summarize(samples, preds)


def test_registry_lists_known_names():
  names = task_names()
  for n in ["mmbench", "textvqa", "textvqa_ocr", "pope", "scienceqa_img", "gqa", "vizwiz", "seed_image", "mmmu",
            "docvqa", "chartqa", "ai2d", "nextqa", "intentqa", "egoschema"]:
    assert n in names and TASKS[n].name == n
    assert get_task(n).kind in ("generate", "choice")
  with pytest.raises(UnknownTaskError, match="known tasks: .*textvqa"):
    get_task("txtvqa")
  assert issubclass(TASKS["pope"], Task) and Sample("1", "q", "a").meta == {}


# --- TextVQA ----------------------------------------------------------------------------------------------------
TEXTVQA_ANSWERS = ["nokia"] * 3 + ["nokia phone", "samsung"] + ["nokia"] * 5   # 8 x "nokia"


def textvqa_dir(tmp_path, with_llava=True):
  d = tmp_path / "textvqa"
  write_json(d / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": [
      {"question": "what brand is this phone?", "image_id": "003a", "question_id": 34602,
       "answers": TEXTVQA_ANSWERS, "set_name": "val"},
      {"question": "What number is on the shirt?", "image_id": "003a", "question_id": 34603,
       "answers": ["23"] * 2 + ["twenty three"] + ["22"] * 7, "set_name": "val"},
  ]})
  if with_llava:  # LLaVA's question file: question_id is the IMAGE id (not unique), prompt holds the OCR tokens
    write_lines(d / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": "003a", "image": "003a.jpg", "text": "what brand is this phone?\nReference OCR token: "
         "NOKIA, 12:30\nAnswer the question using a single word or phrase.", "category": "default"},
        {"question_id": "003a", "image": "003a.jpg", "text": "What number is on the shirt?\nReference OCR token: "
         "23\nAnswer the question using a single word or phrase.", "category": "default"},
    ])
  return str(d)


def test_textvqa_plain_and_scores(tmp_path):
  d = textvqa_dir(tmp_path)
  task = get_task("textvqa")
  samples, summary = run(task, d, {"34602": "Nokia.", "34603": "23"})
  assert [s.question_id for s in samples] == ["34602", "34603"]
  assert samples[0].prompt == "what brand is this phone?\nAnswer the question using a single word or phrase."
  assert samples[0].image == os.path.join(d, "train_images", "003a.jpg")
  # "Nokia." -> "nokia": 8 of 10 match -> 1.0; "23": 2 of 10 match -> 0.6 (see test_metrics); mean 0.8
  assert summary["accuracy"] == pytest.approx(0.8) and summary["count"] == 2
  # the JSON file itself works as --data too
  assert len(list(task.samples(os.path.join(d, "TextVQA_0.5.1_val.json")))) == 2


def test_textvqa_ocr_from_llava_file(tmp_path):
  d = textvqa_dir(tmp_path)
  samples = list(get_task("textvqa_ocr").samples(d))
  assert [s.question_id for s in samples] == ["34602", "34603"]   # official ids, matched by (image, question)
  assert samples[1].prompt.split("\n")[1] == "Reference OCR token: 23"
  assert samples[1].answers[2] == "twenty three"


def test_textvqa_ocr_from_record_tokens(tmp_path):
  d = tmp_path / "t"
  write_json(d / "TextVQA_0.5.1_val.json", {"data": [
      {"question": "what is written?", "image_id": "x", "question_id": 1, "answers": ["stop"] * 10,
       "ocr_tokens": ["STOP", "ahead"]}]})
  (s,) = get_task("textvqa_ocr").samples(str(d))
  assert s.prompt == ("what is written?\nReference OCR token: STOP, ahead\n"
                      "Answer the question using a single word or phrase.")


def test_textvqa_llava_line_without_annotation_is_named(tmp_path):
  d = textvqa_dir(tmp_path)
  with open(os.path.join(d, "llava_textvqa_val_v051_ocr.jsonl"), "a") as f:
    f.write(json.dumps({"question_id": "zzz", "text": "unknown question?\nAnswer."}) + "\n")
  with pytest.raises(TaskDataError, match=r"record 3: no annotation .*'zzz'"):
    list(get_task("textvqa_ocr").samples(d))


# --- VizWiz -----------------------------------------------------------------------------------------------------
def test_vizwiz(tmp_path):
  ann = write_json(tmp_path / "vizwiz" / "Annotations" / "val.json", [
      {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answerable": 1, "answer_type": "other",
       "answers": [{"answer": "coffee", "answer_confidence": "yes"}] * 3 + [{"answer": "tea",
                   "answer_confidence": "maybe"}] * 7},
      {"image": "VizWiz_val_00000001.jpg", "question": "What color?", "answerable": 0,
       "answer_type": "unanswerable", "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10},
  ])
  os.makedirs(tmp_path / "vizwiz" / "val")
  samples, summary = run(get_task("vizwiz"), ann, {"0": "Coffee", "1": "Unanswerable"})
  assert samples[0].prompt == ("What is this?\nWhen the provided information is insufficient, respond with "
                               "'Unanswerable'.\nAnswer the question using a single word or phrase.")
  assert samples[0].image == os.path.join(str(tmp_path / "vizwiz" / "val"), "VizWiz_val_00000000.jpg")
  # 3 of 10 match -> 0.9; 10 of 10 -> 1.0
  assert summary["accuracy"] == pytest.approx(0.95)
  assert summary["accuracy/other"] == pytest.approx(0.9) and summary["accuracy/unanswerable"] == 1.0


# --- GQA --------------------------------------------------------------------------------------------------------
def test_gqa(tmp_path):
  write_json(tmp_path / "gqa" / "testdev_balanced_questions.json", {
      "201307251": {"imageId": "n161313", "question": "Is it overcast?", "answer": "no", "fullAnswer": "No, it is"
                    " clear.", "types": {"structural": "verify", "semantic": "global", "detailed": "weatherVerify"}},
      "201640614": {"imageId": "n235859", "question": "Who is wearing the dress?", "answer": "woman",
                    "types": {"structural": "query", "semantic": "rel", "detailed": "relS"}},
  })
  samples, summary = run(get_task("gqa"), str(tmp_path / "gqa"), {"201307251": "No.", "201640614": "The woman"})
  assert samples[0].image.endswith(os.path.join("images", "n161313.jpg"))
  # "No." -> "no" matches; "The woman" -> "the woman" != "woman" (exact match, no article removal)
  assert summary["accuracy"] == 0.5 and summary["accuracy/verify"] == 1.0 and summary["accuracy/query"] == 0.0
  write_json(tmp_path / "bad" / "testdev_balanced_questions.json", {"1": {"imageId": "x", "answer": "no"}})
  with pytest.raises(TaskDataError, match=r"question 1: missing field 'question'"):
    list(get_task("gqa").samples(str(tmp_path / "bad")))


# --- DocVQA -----------------------------------------------------------------------------------------------------
def test_docvqa(tmp_path):
  f = write_json(tmp_path / "docvqa" / "val" / "val_v1.0.json", {"dataset_name": "docvqa", "dataset_split": "val",
      "dataset_version": "1.0", "data": [
          {"questionId": 49153, "question": "What is the date?", "question_types": ["others"],
           "image": "documents/pybv0228_81.png", "docId": 14465, "answers": ["Dec 12, 2001", "December 12, 2001"]},
          {"questionId": 24580, "question": "Who signed?", "question_types": ["handwritten", "form"],
           "image": "documents/xyz.png", "docId": 1, "answers": ["John"]},
      ]})
  samples, summary = run(get_task("docvqa"), f, {"49153": "dec 12, 2001", "24580": "Jon"})
  assert samples[0].image == os.path.join(str(tmp_path / "docvqa" / "val"), "documents", "pybv0228_81.png")
  # exact -> 1.0; "jon" vs "john": 1 edit / 4 -> 0.75; mean 0.875
  assert summary["anls"] == pytest.approx(0.875)
  assert summary["anls/handwritten"] == pytest.approx(0.75)


# --- ChartQA ----------------------------------------------------------------------------------------------------
def test_chartqa_folder_and_file(tmp_path):
  d = tmp_path / "ChartQA Dataset" / "test"
  write_json(d / "test_human.json", [{"imgname": "41699051005347.png", "query": "What is the peak value?",
                                      "label": "62"}])
  write_json(d / "test_augmented.json", [{"imgname": "a.png", "query": "Share of Brazil?", "label": "25%"},
                                         {"imgname": "b.png", "query": "Which color is the largest?",
                                          "label": "Blue"}])
  samples, summary = run(get_task("chartqa"), str(d),
                         {"human/0": "60", "augmented/0": "0.26", "augmented/1": "green"})
  assert [s.question_id for s in samples] == ["human/0", "augmented/0", "augmented/1"]
  assert samples[0].prompt == "What is the peak value?\nAnswer the question with a single word."
  assert samples[0].image == os.path.join(str(d), "png", "41699051005347.png")
  # 60 vs 62: 3.2% -> right; 0.26 vs 25% = 0.25: 4% -> right; green != blue
  assert summary["relaxed_accuracy"] == pytest.approx(2 / 3)
  assert summary["relaxed_accuracy/human"] == 1.0 and summary["relaxed_accuracy/augmented"] == 0.5
  ids = [s.question_id for s in get_task("chartqa").samples(str(d / "test_augmented.json"))]
  assert ids == ["0", "1"]


# --- POPE -------------------------------------------------------------------------------------------------------
def pope_dir(tmp_path):
  d = tmp_path / "pope"
  for cat in ("adversarial", "random"):
    write_lines(d / f"coco_pope_{cat}.json", [
        {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
         "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog in the image?",
         "label": "no"},
    ])
  return str(d)


def test_pope_folder(tmp_path):
  d = pope_dir(tmp_path)
  preds = {"adversarial/1": "Yes, there is a snowboard.", "adversarial/2": "Yes.",
           "random/1": "Yes", "random/2": "No, there is not."}
  samples, summary = run(get_task("pope"), d, preds)
  assert samples[0].prompt == "Is there a snowboard in the image?\nAnswer the question using a single word or phrase."
  assert samples[0].image == os.path.join(d, "val2014", "COCO_val2014_000000310196.jpg")
  # adversarial: TP 1, FP 1 -> precision 0.5, recall 1, f1 2/3, acc 0.5, yes 1.0
  # random: TP 1, TN 1 -> precision 1, recall 1, f1 1, acc 1, yes 0.5
  assert summary["f1/adversarial"] == pytest.approx(2 / 3) and summary["f1/random"] == 1.0
  assert summary["f1"] == pytest.approx((2 / 3 + 1) / 2) and summary["accuracy"] == pytest.approx(0.75)
  assert summary["yes_ratio/adversarial"] == 1.0 and summary["count"] == 4
  # LLaVA's question file beside them: its ids, paired by position within each category
  write_lines(os.path.join(d, "llava_pope_test.jsonl"), [
      {"question_id": 101, "category": "adversarial"}, {"question_id": 102, "category": "adversarial"},
      {"question_id": 201, "category": "random"}, {"question_id": 202, "category": "random"}])
  samples = list(get_task("pope").samples(d))
  assert [(s.question_id, s.answers) for s in samples] == [("101", "yes"), ("102", "no"), ("201", "yes"),
                                                           ("202", "no")]
  os.remove(os.path.join(d, "llava_pope_test.jsonl"))
  # one file: the file's own ids
  ids = [s.question_id for s in get_task("pope").samples(os.path.join(d, "coco_pope_random.json"))]
  assert ids == ["1", "2"]


def test_pope_bad_line_is_named(tmp_path):
  f = tmp_path / "coco_pope_popular.json"
  f.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "q", "label": "yes"}) + "\n{not json\n")
  with pytest.raises(TaskDataError, match=r"coco_pope_popular.json, line 2: not valid JSON"):
    list(get_task("pope").samples(str(f)))
  f.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "q", "label": "maybe"}) + "\n")
  with pytest.raises(TaskDataError, match=r"record 0: label 'maybe'"):
    list(get_task("pope").samples(str(f)))


# --- MMBench ----------------------------------------------------------------------------------------------------
PNG = base64.b64encode(b"\x89PNG fake image bytes" * 8).decode()
MMB_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]


def test_mmbench_llava_file_expands_rotations(tmp_path):
  f = write_table(tmp_path / "mmbench_dev_20230712.tsv", MMB_HEADER, [
      [241, "What is the color?", "nan", "red", "green", "blue", "yellow", "B", "color", PNG, "src", "attr", "", "dev"],
      [242, "Which is bigger?", "Look closely.", "cat", "dog", "nan", "nan", "A", "size", PNG, "src", "rel", "",
       "dev"],
  ], "\t")
  samples = list(get_task("mmbench").samples(f))
  assert [s.question_id for s in samples] == ["241", "1000241", "2000241", "3000241", "242", "1000242"]
  assert samples[0].prompt == ("What is the color?\nA. red\nB. green\nC. blue\nD. yellow\n"
                               "Answer with the option's letter from the given choices directly.")
  # round 1 shows [green, blue, yellow, red]: green (the answer) is now A; round 3 shows [yellow, red, green, blue]
  assert samples[1].options == ["green", "blue", "yellow", "red"] and samples[1].answers == "A"
  assert samples[3].options == ["yellow", "red", "green", "blue"] and samples[3].answers == "C"
  assert samples[4].prompt.startswith("Look closely.\nWhich is bigger?\nA. cat\nB. dog\nAnswer")
  assert samples[5].answers == "B" and samples[0].image_bytes == base64.b64decode(PNG)
  # Question 241 right in all 4 rounds (by letter or by option text); 242 right in round 0 only.
  preds = {"241": "B", "1000241": "A. green", "2000241": "(D)", "3000241": "green",
           "242": "A", "1000242": "A"}
  summary = get_task("mmbench").summarize(samples, preds)
  assert summary["accuracy"] == 0.5 and summary["single_pass_accuracy"] == 1.0 and summary["count"] == 2
  assert summary["accuracy/color"] == 1.0 and summary["accuracy/size"] == 0.0


def test_mmbench_vlmevalkit_circular_rows(tmp_path):
  # VLMEvalKit's file holds the rotations as rows; their image cell is the index of the row holding the image.
  f = write_table(tmp_path / "MMBench_DEV_EN.tsv", MMB_HEADER, [
      [5, "Q?", "nan", "x", "y", "nan", "nan", "A", "c", PNG, "", "", "", "dev"],
      [1000005, "Q?", "nan", "y", "x", "nan", "nan", "B", "c", "5", "", "", "", "dev"],
  ], "\t")
  samples = list(get_task("mmbench").samples(f))
  assert [s.question_id for s in samples] == ["5", "1000005"]
  assert samples[1].image_bytes == samples[0].image_bytes and samples[1].answers == "B"
  assert get_task("mmbench").summarize(samples, {"5": "A", "1000005": "A"})["accuracy"] == 0.0
  # VLMEvalKit's reading: " A\n" -> A, "x\t" -> option text x = B (stripped); a refusal names no option even
  # beside a letter; "C" (of 2 options) is no letter here and names no option text.
  assert get_task("mmbench").summarize(samples, {"5": " A\n", "1000005": "x\t"})["accuracy"] == 1.0
  assert [get_task("mmbench").score(samples[1], p) for p in ("Cannot determine the answer: B", "C", "B")] == [0, 0, 1]


def test_mmbench_malformed_rows(tmp_path):
  f = write_table(tmp_path / "m.tsv", MMB_HEADER, [
      [1, "Q?", "nan", "x", "y", "nan", "nan", "C", "c", PNG, "", "", "", "dev"]], "\t")
  with pytest.raises(TaskDataError, match=r"m.tsv, line 2: answer 'C' is not one of A, B"):
    list(get_task("mmbench").samples(f))
  with open(f, "a") as fh:
    fh.write("2\tonly three\tfields\n")
  with pytest.raises(TaskDataError, match=r"m.tsv, line 3: 3 fields, header has 14"):
    list(get_task("mmbench").samples(f))


# --- ScienceQA-IMG ----------------------------------------------------------------------------------------------
def test_scienceqa_img(tmp_path):
  d = tmp_path / "scienceqa"
  write_json(d / "problems.json", {
      "4": {"question": "Which property do these three objects have in common?", "choices": ["shiny", "slippery",
            "opaque"], "answer": 1, "hint": "Select the best answer.", "image": "image.png", "subject":
            "natural science", "grade": "grade2", "split": "test"},
      "5": {"question": "Which word is a noun?", "choices": ["run", "cat"], "answer": 1, "hint": "",
            "image": None, "subject": "language science", "split": "test"},
      "6": {"question": "Which state is farthest north?", "choices": ["Ohio", "Texas", "Maine", "Utah"],
            "answer": 2, "hint": "", "image": "image.png", "subject": "social science", "split": "test"},
  })
  write_json(d / "pid_splits.json", {"train": [], "test": ["4", "5", "6"]})
  samples, summary = run(get_task("scienceqa_img"), str(d), {"4": "B", "6": "C."})
  assert [s.question_id for s in samples] == ["4", "6"]        # problem 5 has no image: not in ScienceQA-IMG
  assert samples[0].prompt == ("Context: Select the best answer.\nWhich property do these three objects have in "
                               "common?\nA. shiny\nB. slippery\nC. opaque\nAnswer with the option's letter from "
                               "the given choices directly.")
  assert samples[1].prompt.startswith("Which state is farthest north?\nA. Ohio")
  assert samples[0].image == os.path.join(str(d), "images", "test", "4", "image.png")
  # "B" right; "C." is not accepted by LLaVA's parser (needs "C" or "C. ...") -> 0.5
  assert summary["accuracy"] == 0.5 and summary["accuracy/natural science"] == 1.0
  # LLaVA's converted question file, when present, supplies the prompt text
  write_json(d / "llava_test_CQM-A.json", [{"id": "6", "image": "6/image.png", "conversations": [
      {"from": "human", "value": "<image>\nContext: N/A\nWhich state is farthest north?\nA. Ohio\nB. Texas\n"
       "C. Maine\nD. Utah"}, {"from": "gpt", "value": "C"}]}])
  samples = list(get_task("scienceqa_img").samples(str(d)))
  assert samples[1].prompt == ("Context: N/A\nWhich state is farthest north?\nA. Ohio\nB. Texas\nC. Maine\n"
                               "D. Utah\nAnswer with the option's letter from the given choices directly.")
  assert samples[0].prompt.startswith("Context: Select the best answer.\n")


# --- SEED-Bench -------------------------------------------------------------------------------------------------
def test_seed_image(tmp_path):
  f = write_json(tmp_path / "seed" / "SEED-Bench.json", {
      "question_type": {"Scene Understanding": 1, "Instance Identity": 2},
      "questions": [
          {"answer": "A", "choice_a": "A beach", "choice_b": "A city", "choice_c": "A forest", "choice_d": "A desert",
           "data_id": "1454426_2591111986", "data_type": "image", "question": "What is the setting?",
           "question_id": "101669", "question_type_id": 1},
          {"answer": "B", "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d", "data_id": "v.mp4",
           "data_type": "video", "question": "?", "question_id": "9", "question_type_id": 10},
          {"answer": "C", "choice_a": "dog", "choice_b": "cat", "choice_c": "bird", "choice_d": "fish",
           "data_id": "x.jpg", "data_type": "image", "question": "What animal?", "question_id": "7",
           "question_type_id": 2},
      ]})
  samples, summary = run(get_task("seed_image"), f, {"101669": "A", "7": "C. bird"})
  assert [s.question_id for s in samples] == ["101669", "7"]
  assert samples[0].image == os.path.join(str(tmp_path / "seed"), "SEED-Bench-image", "1454426_2591111986")
  # LLaVA's SEED scorer compares the answer text with the letter exactly: "C. bird" != "C"
  assert summary["accuracy"] == 0.5 and summary["accuracy/Scene Understanding"] == 1.0
  bad = write_json(tmp_path / "bad" / "SEED-Bench.json", {"questions": [
      {"answer": 1, "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d", "data_id": "x.jpg",
       "data_type": "image", "question": "?", "question_id": "5"}]})
  with pytest.raises(TaskDataError, match=r"answer 1 is not one of A, B, C, D"):  # an int, not a letter
    list(get_task("seed_image").samples(bad))


# --- AI2D -------------------------------------------------------------------------------------------------------
def test_ai2d_parquet_and_json(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = [{"question": "Which part is the root?", "options": ["A", "B", "C", "D"], "answer": "3",
           "image": {"bytes": b"img0", "path": None}},
          {"question": "What eats grass?", "options": ["rabbit", "hawk"], "answer": "0",
           "image": {"bytes": b"img1", "path": None}}]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test-00000-of-00001.parquet")
  samples, summary = run(get_task("ai2d"), str(tmp_path), {"0": "D", "1": "hawk"})
  assert samples[0].prompt == ("Which part is the root?\nA. A\nB. B\nC. C\nD. D\n"
                               "Answer with the option's letter from the given choices directly.")
  assert samples[1].image_bytes == b"img1" and samples[1].answers == "A"
  assert summary["accuracy"] == 0.5   # "D" right; "hawk" names option B, gold A
  f = write_lines(tmp_path / "ai2d.jsonl", [{"question": "q", "options": ["x", "y"], "answer": 1,
                                             "image": "imgs/1.png"}])
  (s,) = get_task("ai2d").samples(f)
  assert s.image == os.path.join(str(tmp_path), "imgs/1.png") and s.answers == "B"
  bad = write_lines(tmp_path / "bad.jsonl", [{"question": "q", "options": ["x"], "answer": 4, "image": "i.png"}])
  with pytest.raises(TaskDataError, match=r"record 0: answer 4 is out of range"):
    list(get_task("ai2d").samples(bad))
  for record, message in [({"options": "['x', 'y'", "answer": 0}, r"options \"\['x', 'y'\" is not a list literal"),
                          ({"options": ["x", "y"], "answer": None}, r"answer None is not an option index")]:
    bad = write_lines(tmp_path / "bad.jsonl", [{"question": "q", "image": "i.png", **record}])
    with pytest.raises(TaskDataError, match=r"record 0: " + message):
      list(get_task("ai2d").samples(bad))


# --- MMMU -------------------------------------------------------------------------------------------------------
def test_mmmu_parquet_folder(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = [{"id": "validation_Accounting_1", "question": "<image 1> What is the total?", "options": "['$10', '$20']",
           "answer": "B", "question_type": "multiple-choice", "image_1": {"bytes": b"png1", "path": "1.png"}},
          {"id": "validation_Math_3", "question": "Compute x.", "options": "[]", "answer": "1250",
           "question_type": "open", "image_1": None}]
  os.makedirs(tmp_path / "Accounting")
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "Accounting" / "validation-00000-of-00001.parquet")
  samples, summary = run(get_task("mmmu"), str(tmp_path),
                         {"validation_Accounting_1": "(B)", "validation_Math_3": "So x is 1,300."})
  assert samples[0].prompt == ("<image 1> What is the total?\nA. $10\nB. $20\n\n"
                               "Answer with the option's letter from the given choices directly.")
  assert samples[1].prompt == "Compute x.\n\nAnswer the question using a single word or phrase."
  assert samples[0].image_bytes == b"png1" and samples[1].image is None and samples[1].image_bytes is None
  assert samples[0].category == "Accounting"
  assert summary["accuracy"] == 0.5 and summary["accuracy/Accounting"] == 1.0 and summary["accuracy/Math"] == 0.0


# --- Video ------------------------------------------------------------------------------------------------------
NEXT_HEADER = ["video", "frame_count", "width", "height", "question", "answer", "qid", "type", "a0", "a1", "a2",
               "a3", "a4"]


def test_nextqa(tmp_path):
  d = tmp_path / "nextqa"
  write_table(d / "val.csv", NEXT_HEADER, [
      [4010069381, 369, 640, 480, "how do the two man play the instrument", 2, 6, "CH", "roll the handle",
       "tap their feet", "strum the string", "hit with sticks", "pat with hand"],
      [4010069381, 369, 640, 480, "why is the man smiling", 0, 7, "CW", "happy", "sad", "tired", "angry", "bored"],
  ], ",")
  write_json(d / "map_vid_vidorID.json", {"4010069381": "1106/4010069381"})
  # IG-VLM's reading: "C" -> C (right); "(B) sad" -> "B)" -> B, "sad" != "happy" (wrong)
  samples, summary = run(get_task("nextqa"), str(d), {"4010069381_6": "C", "4010069381_7": "(B) sad"})
  assert samples[0].video == os.path.join(str(d), "NExTVideo", "1106/4010069381.mp4")
  # IG-VLM's 7B prompt (eval_llava_multiplechoice.py), its user turn: the chat template adds USER:/ASSISTANT:
  assert samples[0].prompt == ("The provided image arranges keyframes from a video in a grid view. Question: how do "
                               "the two man play the instrument A:roll the handle. B:tap their feet. C:strum the "
                               "string. D:hit with sticks. E:pat with hand. \nSelect the correct answer from the "
                               "options.")
  assert samples[0].meta["collage"] == "igvlm"
  assert samples[0].answers == "C" and summary["accuracy"] == 0.5 and summary["accuracy/CH"] == 1.0
  verbatim = next(get_task("nextqa", prompt="igvlm_verbatim").samples(str(d)))
  assert verbatim.prompt == ("Select correct option to answer the question. USER: <image>\nThe provided image "
                             "arranges keyframes from a video in a grid view. Question: how do the two man play the "
                             "instrument A:roll the handle. B:tap their feet. C:strum the string. D:hit with sticks. "
                             "E:pat with hand. \nSelect the correct answer from the options. \nASSISTANT:\nAnswer:")
  llava = list(get_task("nextqa", prompt="llava", collage="linspace_2x3").samples(str(d)))
  assert llava[0].prompt == ("how do the two man play the instrument\nA. roll the handle\nB. tap their feet\nC. strum "
                             "the string\nD. hit with sticks\nE. pat with hand\nAnswer with the option's letter from "
                             "the given choices directly.")
  assert llava[0].meta["collage"] == "linspace_2x3"
  with pytest.raises(ValueError, match="nextqa: collage='3x2', expected one of igvlm, linspace_2x3"):
    get_task("nextqa", collage="3x2")
  with pytest.raises(ValueError, match="nextqa: prompt='gpt4v', expected one of igvlm, igvlm_verbatim, llava"):
    get_task("nextqa", prompt="gpt4v")
  write_table(tmp_path / "bad" / "val.csv", NEXT_HEADER, [[1, 1, 1, 1, "q", 7, 0, "CW", "a", "b", "c", "d", "e"]],
              ",")
  with pytest.raises(TaskDataError, match=r"val.csv, line 2: answer '7' is not an index 0-4"):
    list(get_task("nextqa").samples(str(tmp_path / "bad")))


def test_intentqa(tmp_path):
  header = ["video_id", "frame_count", "width", "height", "question", "answer", "qid", "type", "a0", "a1", "a2",
            "a3", "a4"]
  write_table(tmp_path / "IntentQA" / "test.csv", header, [
      ["5432", 100, 640, 480, "why did the boy run", 4, 0, "CW", "to hide", "to sleep", "to eat", "to sing",
       "to catch the ball"]], ",")
  samples, summary = run(get_task("intentqa"), str(tmp_path / "IntentQA"), {"5432_0": "to catch the ball"})
  assert samples[0].video == os.path.join(str(tmp_path / "IntentQA"), "videos", "5432.mp4")
  assert samples[0].answers == "E" and summary["accuracy"] == 0.0   # IG-VLM reads letters only: no "E" here
  _, summary = run(get_task("intentqa", prompt="llava"), str(tmp_path / "IntentQA"), {"5432_0": "to catch the ball"})
  assert summary["accuracy"] == 1.0                                  # VLMEvalKit's can_infer matches the text
  _, summary = run(get_task("intentqa"), str(tmp_path / "IntentQA"), {"5432_0": "The answer is E: to catch it"})
  assert summary["accuracy"] == 1.0


def test_egoschema(tmp_path):
  d = tmp_path / "egoschema"
  q = {"q_uid": "0074f737-11cb", "google_drive_id": "x", "question": "What is c doing?",
       **{f"option {k}": f"option text {k}" for k in range(5)}}
  write_json(d / "questions.json", [q, {**q, "q_uid": "no-answer"}])
  write_json(d / "subset_answers.json", {"0074f737-11cb": 3})
  samples, summary = run(get_task("egoschema"), str(d), {"0074f737-11cb": "D"})
  assert [s.question_id for s in samples] == ["0074f737-11cb"]   # only questions with public answers
  assert samples[0].video == os.path.join(str(d), "videos", "0074f737-11cb.mp4")
  assert summary["accuracy"] == 1.0
  # IG-VLM compares option texts: a letter whose text equals the gold's counts too
  write_json(d / "questions.json", [{**q, "option 1": "option text 3"}])
  assert run(get_task("egoschema"), str(d), {"0074f737-11cb": "B"})[1]["accuracy"] == 1.0


def test_missing_files_are_clear_errors(tmp_path):
  with pytest.raises(TaskDataError, match="none of val_v1.0.json"):
    list(get_task("docvqa").samples(str(tmp_path)))
  with pytest.raises(TaskDataError, match="does not exist"):
    list(get_task("gqa").samples(str(tmp_path / "nope.json")))
  (tmp_path / "val.json").write_text('[{"image": "a.jpg", "question": "q", "answers": [')
  with pytest.raises(TaskDataError, match=r"val.json: not valid JSON \(line 1"):
    list(get_task("vizwiz").samples(str(tmp_path / "val.json")))
