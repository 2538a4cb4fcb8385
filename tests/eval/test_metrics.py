"""Official metrics on hand-worked cases. Every expected value is worked out from the reference definitions in the
comments, not printed from the code under test."""
from __future__ import annotations

import random

import pytest

from m3_jax.eval import metrics as m


# --- EvalAI normalisation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),                        # number word -> digit (after lower-casing)
    ("none", "0"),                       # "none" is in EvalAI's number map
    ("The Dog", "dog"),                  # article dropped
    ("a cat and an owl", "cat and owl"),
    ("1,000", "1000"),                   # comma inside a number removed
    ("3.5", "3.5"),                      # a period followed by a digit stays
    ("end.", "end"),                     # other periods go
    ("hello-world", "hello world"),      # mark inside a word -> space
    ("yes!", "yes"),                     # trailing mark -> space, then whitespace collapses
    ("dont", "don't"),                   # contraction table
    ("isnt it", "isn't it"),
    ("what?", "what"),                   # "?" removed up front
    ("john's", "john 's"),               # "'s" split off
    ("10%", "10%"),                      # "%" is not in EvalAI's punctuation list
    ("coca - cola", "coca cola"),        # " -" present: the mark is deleted, not spaced
    ("  Ten\tdollars\n", "10 dollars"),
])
def test_evalai_normalize(raw, expected):
  assert m.evalai_normalize(raw) == expected


# --- VQA soft accuracy ------------------------------------------------------------------------------------------
# With k of 10 answers equal to the prediction: leaving out a match leaves k-1 matches, leaving out another
# answer leaves k, so acc = (k*min(1,(k-1)/3) + (10-k)*min(1,k/3)) / 10:
#   k=0 -> 0; k=1 -> 9*(1/3)/10 = 0.3; k=2 -> (2/3 + 16/3)/10 = 0.6; k=3 -> (3*2/3 + 7)/10 = 0.9; k>=4 -> 1.
@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_soft_accuracy_counts(k, expected):
  answers = ["cat"] * k + ["dog"] * (10 - k)
  assert m.vqa_soft_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_soft_accuracy_normalises_both_sides():
  # "Two." and "2" and "two" all normalise to "2": 3 matches -> 0.9 (see above).
  answers = ["2", "two", "Two.", "3", "3", "3", "3", "3", "3", "3"]
  assert m.vqa_soft_accuracy("2", answers) == pytest.approx(0.9)
  # "1,000" and "1000" are the same answer; "one thousand" is not (only zero..ten are mapped).
  answers = ["1000", "1,000", "one thousand"] + ["x"] * 7
  assert m.vqa_soft_accuracy("1,000", answers) == pytest.approx(0.6)
  assert m.vqa_soft_accuracy("the dog!", ["dog"] * 4 + ["cat"] * 6) == 1.0


# --- ANLS -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred, answers, expected", [
    ("hello", ["hello"], 1.0),
    ("Hello ", ["hello"], 1.0),             # normalised equal: distance 0
    ("helo", ["hello"], 0.8),               # 1 deletion / max(4, 5)
    ("abxy", ["abcd"], 0.5),                # 2 / 4 -> similarity exactly 0.5 is kept (only < 0.5 is zeroed)
    ("axyz", ["abcd"], 0.0),                # 3 / 4 -> 0.25 < 0.5 -> 0
    ("kitten", ["sitting"], 1 - 3 / 7),     # 2 substitutions + 1 insertion over 7: 0.571 >= 0.5
])
def test_anls_cases(pred, answers, expected):
  assert m.anls(pred, answers) == pytest.approx(expected)


def test_anls_takes_best_answer_and_raw_lengths():
  # best of two answers: "dec 12" vs "dec 12, 2001" (distance 6 / 12 -> 0.5) and "Dec 12" (exact -> 1)
  assert m.anls("dec 12", ["Dec 12, 2001", "Dec 12"]) == 1.0
  assert m.anls("dec 12", ["Dec 12, 2001"]) == pytest.approx(0.5)
  # The reference divides by the RAW gold length: "abc " (len 4) vs "ab": distance 1, length max(4, 2) = 4 -> 0.75.
  assert m.anls("ab", ["abc "]) == pytest.approx(0.75)
  # A prediction is stripped first, as the pipelines strip generated text: " ab " scores as "ab", 1 - 1/3 (it got
  # 1 - 1/4 = 0.75 from its padded length 4 before).
  assert m.anls(" ab ", ["abc"]) == m.anls("ab", ["abc"]) == pytest.approx(1 - 1 / 3)
  assert m.anls("ab\n\n", ["abc"]) == pytest.approx(1 - 1 / 3)
  assert m.levenshtein("kitten", "sitting") == 3 and m.levenshtein("", "abc") == 3


# --- ChartQA relaxed accuracy -----------------------------------------------------------------------------------
@pytest.mark.parametrize("pred, target, expected", [
    ("10.4", "10", True),      # |10.4 - 10| / 10 = 0.04 <= 0.05
    ("10.5", "10", True),      # exactly 5%
    ("10.6", "10", False),     # 6%
    ("9.6", "10", True),
    ("0.52", "50%", True),     # 50% -> 0.5; 0.02 / 0.5 = 4%
    ("52%", "50%", True),      # 0.52 vs 0.5
    ("56%", "50%", False),     # 0.06 / 0.5 = 12%
    ("52", "50%", False),      # 52 vs 0.5
    ("0.0", "0", False),       # target 0 is falsy -> string comparison "0.0" != "0"
    ("0", "0", True),
    ("Yes", "yes", True),      # case-insensitive string match
    ("1,000", "1000", False),  # float("1,000") fails -> strings differ
    ("Brazil ", "brazil", True),
])
def test_relaxed_correctness(pred, target, expected):
  assert m.relaxed_correctness(pred, target) is expected


# --- POPE -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("No", "no"), ("no", "no"),
    ("Yes, there is a dog in the image.", "yes"),
    ("No, there is no dog.", "no"),
    ("There is not a cat.", "no"),
    ("Not really", "yes"),                  # "Not" (capital) is not one of the words the reference checks
    ("NO", "yes"),
    ("Yes. There is no cat.", "yes"),       # only the first sentence counts
    ("no, absolutely", "no"),               # comma removed before splitting
    ("None", "yes"),
    ("No\n", "no"), (" no ", "no"),          # stripped first: "No\n" was one word "No\n" -> yes before
    ("\nYes, no doubt", "no"),              # stripped, then the words of the first sentence: "no" is one
])
def test_pope_answer(text, expected):
  assert m.pope_answer(text) == expected


def test_pope_metrics_hand_counts():
  labels = ["yes", "yes", "no", "no", "yes"]
  preds = ["Yes", "No", "No.", "Yes, it is", "yes"]
  # TP: 0, 4; FN: 1; TN: 2; FP: 3 -> precision 2/3, recall 2/3, f1 2/3, accuracy 3/5, yes ratio 3/5
  out = m.pope_metrics(preds, labels)
  assert out == pytest.approx({"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
                               "yes_ratio": 0.6})
  # all "no": TP = FP = 0: the reference divides by zero; here precision = recall = f1 = 0
  out = m.pope_metrics(["no", "no"], ["yes", "no"])
  assert out["accuracy"] == 0.5 and out["f1"] == 0.0 and out["yes_ratio"] == 0.0


# --- Multiple choice --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred, n, expected", [
    ("B", 3, "B"), ("B. slippery", 3, "B"), ("The answer is C.", 3, "C"),
    ("b", 3, None),                         # lower case is not a letter answer
    ("B.", 3, None),                        # needs ". " (a space) after the letter
    ("E", 3, None),                         # out of range for 3 choices
    ("The answer is A. The answer is B.", 3, None),  # two "The answer is" -> FAILED
    ("I think it is shiny", 3, None),
])
def test_scienceqa_answer(pred, n, expected):
  assert m.scienceqa_answer(pred, n) == expected


OPTIONS = ["red apple", "green pear", "yellow banana", "blue berry"]


@pytest.mark.parametrize("pred, expected", [
    ("B", "B"), ("(C)", "C"), ("D.", "D"), ("Answer: A", "A"), ("**B**", "B"),
    ("The answer is C. yellow banana", "C"),
    ("A or B", None),                       # two letters, and no option text: undecided
    ("green pear", "B"),                    # by option text
    ("it is a green pear, not a red apple", None),  # two option texts
    ("E", None),                            # not a valid letter for 4 options
    ("I cannot tell", None),                # "I" is not an option letter of A-D
    ("A or B, the green pear", "B"),        # letters ambiguous -> the text decides
    (" C\n", "C"),
    # VLMEvalKit's refusal phrases name no option, even beside a letter or an option's text
    ("Cannot determine the answer", None), ("Cannot determine the answer. B", None),
    ("I'm sorry, but without the image provided I'd say green pear", None),
    # an API failure decides nothing by letter, but the text may still name an option
    ("Failed to obtain answer via API. B", None), ("Failed to obtain answer via API: green pear", "B"),
    ("Z", None), ("Z, none of them; not the green pear", None),   # "Z" without a letter: none of the options
    ("E. green pear", "B"),                 # E is no option here: no letter named, the text decides
    ("A. red apple or B. green pear", None),  # two letters, two texts
])
def test_infer_option(pred, expected):
  assert m.infer_option(pred, OPTIONS) == expected


@pytest.mark.parametrize("pred, expected", [
    ("B", "B"), (" B\n", "B"), ("B. green pear", "B"),
    ("C: yellow banana", "C"),              # first character C; "C:" agrees
    ("B is wrong, A: red apple", "A"),      # "A:" overrides the first character
    ("Answer: B", "A"),                     # the reference's quirk: first character A, and no "X:" / "X)" after
    ("The answer is D) blue berry", "D"),
    ("A) apple. The answer is C: banana", "C"),  # from "answer is" on: only "C:" is left
    ("green pear", None), ("", None),
    ("E", None),                            # E is beyond the 4 options
])
def test_igvlm_option(pred, expected):
  assert m.igvlm_option(pred, OPTIONS) == expected


def test_circular_accuracy_groups_rotations():
  rows = [(7, True), (1000007, True), (2000007, True), (3000007, True),   # all 4 rotations right -> pass
          (8, True), (1000008, False), (2000008, True),                   # one rotation wrong -> fail
          (9, True), (1000009, True)]                                     # 2-option question, both right -> pass
  assert m.circular_accuracy(rows) == pytest.approx(2 / 3)
  assert m.circular_accuracy([(5, False)]) == 0.0


def test_gqa_match():
  assert m.gqa_match("Yes.", "yes") and m.gqa_match("left", "left")
  assert not m.gqa_match("the left", "left") and not m.gqa_match("yes", "no")


# --- MMMU -------------------------------------------------------------------------------------------------------
MMMU_OPTS = ["$10", "$20", "$30", "$40"]


@pytest.mark.parametrize("resp, expected", [
    ("(B)", "B"),
    ("B", "B"),                      # stripped + padded: " B " contains "B "
    ("B\t", "B"), ("\nB\n", "B"),       # whitespace stripped first (" B\t " held no "B " and fell to a random letter)
    ("The answer is (C).", "C"),
    ("A. $10", "A"),                 # no "(A)", no "A " (a "." follows the A): the third pass finds "A."
    ("(A) is wrong, the answer is (D)", "D"),   # two bracketed: the last mention wins
    ("I believe that the correct price should be $30 in total", "C"),  # > 5 words, option text
])
def test_mmmu_parse_multi_choice(resp, expected):
  assert m.mmmu_parse_multi_choice(resp, MMMU_OPTS, random.Random(0)) == expected


def test_mmmu_unparseable_is_random_but_seeded():
  picks = {m.mmmu_parse_multi_choice("no idea", MMMU_OPTS, random.Random(s)) for s in range(40)}
  assert picks <= set("ABCD") and len(picks) > 1
  assert (m.mmmu_parse_multi_choice("no idea", MMMU_OPTS, random.Random(3))
          == m.mmmu_parse_multi_choice("no idea", MMMU_OPTS, random.Random(3)))


def test_mmmu_open():
  # "so the answer is 1,250" -> key "1,250" -> numbers: 1250.0; gold "1250" -> [1250.0]
  assert m.mmmu_eval_open("1250", m.mmmu_parse_open("So the answer is 1,250."))
  assert not m.mmmu_eval_open("1250", m.mmmu_parse_open("So the answer is 1,260."))
  # string answer: gold "mitochondria" contained in the key response
  assert m.mmmu_eval_open("Mitochondria", m.mmmu_parse_open("The organelle is the mitochondria"))
  # one-letter golds are padded with spaces so that "a" does not match inside words
  assert m.mmmu_normalize_str("A") == [" a", "a "]
  assert m.mmmu_normalize_str("3.14159") == [3.14]
  assert m.mmmu_eval_open(["3.14", "pi"], m.mmmu_parse_open("3.14159"))
