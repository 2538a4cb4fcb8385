"""Official benchmark metrics, re-implemented from the scorers that published numbers came from.

Each function names its reference. Quirks of a reference are kept on purpose (and said so), because a number is
only comparable with the paper's when it is computed the same way. Pure Python: no JAX, no NumPy needed.

Every function that reads a model's answer strips it first (`str.strip()`): LLaVA's model_vqa*.py and lmms-eval's
model wrappers strip the generated text before any scorer sees it, so a padded answer must score as the bare one
(without this, " ab " got a higher ANLS than "ab", "No\n" read as yes for POPE and "B\t" as no letter for MMMU).

  evalai_normalize / vqa_soft_accuracy   LLaVA llava/eval/m4c_evaluator.py (EvalAIAnswerProcessor,
                                         TextVQAAccuracyEvaluator), used by lmms-eval's TextVQA/VizWiz too
  anls                                   DocVQA ANLS as lmms-eval / Qwen-VL infographicsvqa_eval compute it
  relaxed_correctness                    pix2struct metrics.py (ChartQA), as lmms-eval calls it
  pope_answer / pope_metrics             LLaVA llava/eval/eval_pope.py
  scienceqa_answer                       LLaVA llava/eval/eval_science_qa.py
  gqa_match                              LLaVA scripts/convert_gqa_for_eval.py + GQA eval.py (exact match)
  infer_option                           VLMEvalKit vlmeval/utils/matching_util.py can_infer (no LLM fallback)
  igvlm_option                           IG-VLM evaluation/direct_answer_eval.py map_prediction_to_answer_v2
  circular_accuracy                      MMBench CircularEval (VLMEvalKit): a question counts only if every
                                         rotation of its options is answered right; rows grouped by index % 1e6
  mmmu_parse_multi_choice / mmmu_parse_open / mmmu_eval_open
                                         MMMU eval/eval_utils.py (as vendored by lmms-eval)
"""
from __future__ import annotations

import random
import re
from typing import Iterable, Mapping, Sequence

# ---------------------------------------------------------------------------------------------------------------
# EvalAI answer normalisation + VQA soft accuracy
# ---------------------------------------------------------------------------------------------------------------

# The EvalAI contraction table: key = how the answer may be written, value = canonical form. Keys written with
# capitals in the reference ("Im", "Ive", "Id've", "I'dve") can never match (answers are lower-cased first), so
# they are left out; "somebody'd" really maps to "somebodyd" in the reference.
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's isnt=isn't
itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock
oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've
she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've
shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've
somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've
someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd thered've=there'd've
there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've
theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've
werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd
wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll
youre=you're youve=you've
""".split())
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
# The reference pattern is r"(?!<=\d)(\.)(?!\d)": its first group is a (mistyped) lookahead that always holds, so
# it removes every period not followed by a digit ("3.5" keeps its point, "end." loses it).
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(,)+(?=\d)")


def _process_punctuation(text: str) -> str:
  out = text
  for p in _PUNCTUATION:
    # A mark next to a space is deleted, one inside a word becomes a space ("hello-world" -> "hello world").
    if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  # The reference passes re.UNICODE (== 32) as the positional `count`: at most 32 periods are removed.
  return _PERIOD_STRIP.sub("", out, count=32)


def _process_digit_article(text: str) -> str:
  words = [_NUMBERS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in _ARTICLES]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def evalai_normalize(answer: str) -> str:
  """EvalAI's answer normalisation (LLaVA's m4c_evaluator.EvalAIAnswerProcessor.__call__).

  Lower-case; commas (so "1,000" -> "1000") and "?" removed; "'s" split off; punctuation removed or spaced;
  periods not followed by a digit removed; number words zero..ten (and "none") -> digits; articles dropped;
  contractions canonicalised ("dont" -> "don't").
  """
  answer = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  answer = answer.replace("\n", " ").replace("\t", " ").strip()
  return _process_digit_article(_process_punctuation(answer))


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """VQA accuracy: mean over the leave-one-out subsets of the human answers of min(1, #matches / 3).

  Prediction and every answer go through `evalai_normalize` first. TextVQA and VizWiz have 10 answers per
  question (the reference asserts 10); any count >= 2 is accepted here.
  """
  if len(answers) < 2:
    raise ValueError(f"VQA accuracy needs >= 2 human answers (10 in TextVQA/VizWiz), got {list(answers)!r}")
  pred = evalai_normalize(prediction)
  gts = [evalai_normalize(a) for a in answers]
  matches = sum(g == pred for g in gts)
  # Leaving out a matching answer leaves matches-1 others, leaving out any other answer leaves `matches`.
  total = sum(min(1.0, (matches - (g == pred)) / 3.0) for g in gts)
  return total / len(gts)


# ---------------------------------------------------------------------------------------------------------------
# ANLS (DocVQA)
# ---------------------------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
  """Edit distance with unit insert / delete / substitute costs."""
  if len(a) > len(b):
    a, b = b, a
  prev = list(range(len(a) + 1))
  for j, cb in enumerate(b, 1):
    cur = [j]
    for i, ca in enumerate(a, 1):
      cur.append(prev[i - 1] if ca == cb else 1 + min(prev[i - 1], prev[i], cur[-1]))
    prev = cur
  return prev[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
  """Average Normalized Levenshtein Similarity of one prediction: max over gold answers of 1 - NL, 0 below 0.5.

  Both strings are stripped, lower-cased and whitespace-collapsed before the distance. As in the reference
  (lmms-eval `anls`, from Qwen-VL's infographicsvqa_eval.py), the normalising length is max of the gold's RAW
  length and the (stripped, as generated text is) prediction's, and a similarity exactly at the threshold is kept
  (only `< threshold` becomes 0).
  """
  if not answers:
    raise ValueError("ANLS needs at least one gold answer")
  prediction = prediction.strip()
  det = " ".join(prediction.lower().split())
  nls = []
  for answer in answers:
    gt = " ".join(answer.strip().lower().split())
    length = max(len(answer.upper()), len(prediction.upper()))
    nls.append(0.0 if length == 0 else levenshtein(gt, det) / length)
  score = 1.0 - min(nls)
  return 0.0 if score < threshold else score


# ---------------------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy
# ---------------------------------------------------------------------------------------------------------------


def _to_float(text: str) -> float | None:
  try:
    if text.endswith("%"):
      return float(text.rstrip("%")) / 100.0  # "50%" == 0.5
    return float(text)
  except ValueError:
    return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
  """ChartQA: numbers within 5% relative error of the target, otherwise case-insensitive exact match.

  A trailing "%" divides by 100. A target of 0 (falsy) falls back to string comparison, as in the reference.
  "1,000" is not a number to `float`, so it is compared as a string.
  """
  prediction, target = prediction.strip(), str(target).strip()
  p, t = _to_float(prediction), _to_float(target)
  if p is not None and t:
    return abs(p - t) / abs(t) <= max_relative_change
  return prediction.lower() == target.lower()


# ---------------------------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------------------------


def pope_answer(text: str) -> str:
  """"yes" or "no" as LLaVA's eval_pope reads a free-form answer.

  Only the first sentence (up to the first "."), commas removed, split on single spaces; the answer is "no" when
  one of the words is exactly "no", "not" or "No" ("Not" or "NO" do not count), else "yes".
  """
  text = text.strip()
  if "." in text:
    text = text.split(".")[0]
  words = text.replace(",", "").split(" ")
  return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
  """accuracy, precision, recall, f1 (positive class "yes") and yes_ratio of parsed answers.

  `predictions` are raw model outputs (parsed with `pope_answer`), `labels` are "yes"/"no". Where the reference
  divides by zero (no predicted or no gold positives) the value is 0.0 here.
  """
  if len(predictions) != len(labels) or not labels:
    raise ValueError(f"POPE needs equally many predictions and labels (>0), got {len(predictions)} and {len(labels)}")
  pred = [pope_answer(p) == "yes" for p in predictions]
  gold = [l != "no" for l in labels]  # the reference maps every label except "no" to yes
  tp = sum(p and g for p, g in zip(pred, gold))
  fp = sum(p and not g for p, g in zip(pred, gold))
  tn = sum(not p and not g for p, g in zip(pred, gold))
  fn = sum(not p and g for p, g in zip(pred, gold))
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"accuracy": (tp + tn) / len(gold), "precision": precision, "recall": recall, "f1": f1,
          "yes_ratio": sum(pred) / len(pred)}


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def scienceqa_answer(prediction: str, num_choices: int) -> str | None:
  """The option letter LLaVA's eval_science_qa reads from an answer, or None ("FAILED" / out of range).

  Accepted: exactly a letter of A-E ("B"), a letter followed by ". " ("B. slippery"), or exactly one
  "The answer is X." in the text. "B." or "b" are not accepted (as in the reference).
  """
  options = "ABCDE"
  prediction = prediction.strip()
  if prediction in options:
    answer = prediction
  elif len(prediction) >= 3 and prediction[0] in options and prediction[1:3] == ". ":
    answer = prediction[0]
  else:
    found = re.findall(r"The answer is ([A-Z]).", prediction)
    answer = found[0] if len(found) == 1 else None
  return answer if answer is not None and answer in options[:num_choices] else None


_OPTION_MARKS = ".()[],:;!*#{}"
# can_infer_option's phrases: an API failure decides nothing (the text may still name an option); a refusal means
# "no option" ('Z'), and so does the word "Z" when no option letter is named.
_API_FAILURE = "Failed to obtain answer via API"
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")


def infer_option(prediction: str, options: Sequence[str]) -> str | None:
  """The option letter a free-form answer names, or None: VLMEvalKit's `can_infer` (vlmeval/utils/matching_util.py
  as of 2024, commit c6bdffd3, the MMBench scorer of the paper's time) without its ChatGPT fallback.

  By letter (`can_infer_option`): a refusal phrase ("Cannot determine the answer", ...) -> None. Else the marks
  .()[],:;!*#{} become spaces and the words are split: exactly one option letter among them -> that letter ("(B)",
  "Answer: B"); no option letter but the word "Z" -> None ('Z', "none of the options"). Failing that (no letter, two
  letters, or "Failed to obtain answer via API"), by text (`can_infer_text`): exactly one option's text, lower-cased,
  inside the lower-cased answer. A lone letter that is not an option ("E" of four) names nothing. Not applied: the
  rules VLMEvalKit added after the paper (2025 #1175: the letter among the last five words, a length cap on text
  matching; 2026 #1552: "the answer is **B**").
  """
  letters = LETTERS[: len(options)]
  text = str(prediction).strip()
  if _API_FAILURE not in text:
    if any(r in text for r in _REFUSALS):
      return None
    words = text
    for mark in _OPTION_MARKS:
      words = words.replace(mark, " ")
    words = words.split()
    named = [l for l in letters if l in words]
    if len(named) == 1:
      return named[0]
    if not named and "Z" in words:
      return None
  lowered = text.lower()
  by_text = [l for l, o in zip(letters, options) if str(o).lower() in lowered]
  return by_text[0] if len(by_text) == 1 else None


def igvlm_option(prediction: str, options: Sequence[str]) -> str | None:
  """The option letter IG-VLM reads from an answer to its video prompt (evaluation/direct_answer_eval.py
  `map_prediction_to_answer_v2`, which the M3 paper's video numbers come from), or None.

  The first character when it is one of A-E; then, in the text from "answer is" on when it says so (else the
  whole text), the first of A-E in letter order written "X:" or "X)" overrides it. A letter beyond the options
  names nothing (the reference would fail on it).
  """
  text = prediction.strip()  # IG-VLM strips the decoded output
  if not text:
    return None
  found = text[0] if text[0] in "ABCDE" else None
  if "answer is " in text:
    text = text[text.index("answer is"):]
  for letter in "ABCDE":
    if f"{letter}:" in text or f"{letter})" in text:
      found = letter
      break
  return found if found is not None and LETTERS.index(found) < len(options) else None


def circular_accuracy(correct_by_index: Iterable[tuple[int, bool]]) -> float:
  """MMBench CircularEval: rows (index, correct) are grouped by index % 1_000_000 (the rotations of one question
  share it); a question scores only if all its rows are correct. Returns the fraction of questions passed."""
  groups: dict[int, bool] = {}
  for index, correct in correct_by_index:
    key = int(index) % 1_000_000
    groups[key] = groups.get(key, True) and bool(correct)
  if not groups:
    raise ValueError("circular accuracy of no rows")
  return sum(groups.values()) / len(groups)


def gqa_match(prediction: str, answer: str) -> bool:
  """GQA exact match after LLaVA's conversion: trailing periods stripped, lower-cased."""
  return prediction.strip().rstrip(".").lower() == answer


# ---------------------------------------------------------------------------------------------------------------
# MMMU
# ---------------------------------------------------------------------------------------------------------------


def mmmu_parse_multi_choice(response: str, options: Sequence[str], rng: random.Random) -> str:
  """MMMU's parse_multi_choice_response: the predicted letter for a list of option texts.

  Candidates, in order of preference: "(A)"; "A " (after padding the response with spaces); "A."; and, for
  responses longer than 5 words, option texts contained in the response. Several candidates: the one whose
  mention starts last. None: a random letter from `rng` (the reference uses the global `random`, seeded 42).
  """
  all_choices = list(LETTERS[: len(options)])
  index2ans = dict(zip(all_choices, options))
  response = response.strip()
  for char in [",", ".", "!", "?", ";", ":", "'"]:
    response = response.strip(char)
  response = " " + response + " "
  index_ans, ans_with_brack, candidates = True, False, []
  for choice in all_choices:
    if f"({choice})" in response:
      candidates.append(choice)
      ans_with_brack = True
  if not candidates:
    candidates = [c for c in all_choices if f"{c} " in response]
  if not candidates:
    candidates = [c for c in all_choices if f"{c}." in response]
  if not candidates and len(response.split()) > 5:
    for index, ans in index2ans.items():
      if ans.lower() in response.lower():
        candidates.append(index)
        index_ans = False
  if not candidates:
    return rng.choice(all_choices)
  if len(candidates) == 1:
    return candidates[0]
  if index_ans:
    pattern = "({})" if ans_with_brack else " {} "
    starts = [response.rfind(pattern.format(c)) for c in candidates]
  else:
    starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
  return candidates[starts.index(max(starts))]  # np.argmax: the first of equal maxima


def _mmmu_extract_numbers(text: str) -> list[str]:
  with_commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
  scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
  simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", text)
  return with_commas + scientific + simple


def _mmmu_is_number(text: str) -> bool:
  try:
    float(text.replace(",", ""))
    return True
  except ValueError:
    return False


def mmmu_normalize_str(text: str) -> list:
  """A number -> [float rounded to 2 decimals]; one character -> [" c", "c "] (no trivial matches); else [lower]."""
  text = text.strip()
  if _mmmu_is_number(text):
    return [round(float(text.replace(",", "")), 2)]
  text = text.lower()
  return [" " + text, text + " "] if len(text) == 1 else [text]


def mmmu_parse_open(response: str) -> list:
  """MMMU's parse_open_response: candidate answers (strings and numbers) from an open-ended response."""
  response = response.strip().strip(".").lower()
  subs = re.split(r"\.\s(?=[A-Z])|\n", response)
  indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
  keys = []
  for i, resp in enumerate(subs):
    if i == len(subs) - 1:
      indicators = indicators + ["="]  # the last sentence may be just an equation
    shortest = None
    for indicator in indicators:
      if indicator in resp:
        tail = resp.split(indicator)[-1].strip()
        if not shortest or len(tail) < len(shortest):  # an empty tail is replaced, as in the reference
          shortest = tail
    if shortest and shortest.strip() not in [":", ",", ".", "!", "?", ";", "'"]:
      keys.append(shortest)
  if not keys:
    keys = [response]
  preds = list(keys)
  for resp in keys:
    preds.extend(_mmmu_extract_numbers(resp))
  out = []
  for p in preds:
    out.extend(mmmu_normalize_str(p))
  return list(dict.fromkeys(out))  # the reference de-duplicates with set(); order does not matter to eval_open


def mmmu_eval_open(gold: str | Sequence[str], parsed: Sequence) -> bool:
  """MMMU's eval_open: a parsed string prediction is right when it contains a normalised gold string; a parsed
  number is right when it equals a normalised gold number."""
  golds = [gold] if isinstance(gold, str) else list(gold)
  norm = [n for g in golds for n in mmmu_normalize_str(g)]
  for pred in parsed:
    if isinstance(pred, str):
      if any(isinstance(n, str) and n in pred for n in norm):
        return True
    elif pred in norm:
      return True
  return False


def mean(values: Iterable[float]) -> float:
  values = list(values)
  return sum(values) / len(values) if values else 0.0


def by_category(scores: Mapping[str, float], categories: Mapping[str, str | None]) -> dict[str, float]:
  """Mean score per category ({category: mean}); samples without a category are left out."""
  groups: dict[str, list[float]] = {}
  for qid, s in scores.items():
    c = categories.get(qid)
    if c is not None:
      groups.setdefault(str(c), []).append(s)
  return {c: mean(v) for c, v in sorted(groups.items())}
