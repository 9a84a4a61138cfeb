"""The main job's generation metrics and designer probe (vpt/language/evals/math_skills.py) against hand counts."""

import math

import numpy as np
import pytest

from vpt.language import train
from vpt.language.evals import math_skills


def test_token_classes_put_both_answer_markers_in_format():
  cls = math_skills.token_class
  assert cls("####") == cls("\u2581####") == cls("$\\boxed{") == cls("#") == "format"
  assert cls("\u258142") == "digit" and cls("=") == "operator" and cls("\n") == "newline" and cls("\u2581apples") == "word"


def test_generation_scores_count_facts_lines_and_standard_errors_by_hand():
  predictions = [
      {"generated": "3 + 4 = 7 apples.\n7 * 2 = 15 in all.\n#### 15"},   # one fact wrong
      {"generated": "10 / 2 = 5 each.\n$\\boxed{5}$"},                    # right, other format
      {"generated": "no arithmetic here"},
  ]
  scores = {"pass@1": 2 / 3, "strict_pass@1": 1 / 3, "format_rate": 1 / 3}
  out = math_skills.generation_scores(scores, predictions)
  assert out["facts_right"] == pytest.approx(2 / 3) and out["facts_written"] == 3
  assert out["lines_per_solution"] == pytest.approx((3 + 2 + 1) / 3)
  assert out["strict_pass@1_se"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 3))
  assert out["facts_right_se"] == pytest.approx(math.sqrt((2 / 3) * (1 / 3) / 3))  # n = facts written


class _Pieces:
  """A tokenizer stand-in with fixed pieces: 0 '####', 1 '$\\boxed{', 2 '▁7', 3 '▁apples', 4 '\\n'."""
  pieces = ["####", "$\\boxed{", "\u25817", "\u2581apples", "\n"]
  vocab_size = len(pieces)

  def id_to_piece(self, i):
    return self.pieces[i]


def test_designer_by_class_matches_a_hand_computation():
  # One row, four positions: targets boxed, 7, apples, boxed; the last is padding (mask 0).
  targets = np.array([[1, 2, 3, 1]])
  mask = np.array([[1.0, 1.0, 1.0, 0.0]])
  alpha = np.array([[0.4, 0.1, 0.2, 0.9]])
  cand = np.array([[[1, 0, 2], [2, 0, 1], [3, 4, 0], [1, 0, 2]]])  # true token first, then the others
  r = np.array([[[0.2, 0.7, 0.1], [0.5, 0.25, 0.25], [0.6, 0.3, 0.1], [0.0, 1.0, 0.0]]])
  out = math_skills.designer_by_class(alpha, r, cand, targets, mask, _Pieces())
  assert out["alpha_format"] == pytest.approx(0.4)  # the masked boxed position is left out
  assert out["alpha_digit"] == pytest.approx(0.1) and out["alpha_word"] == pytest.approx(0.2)
  assert math.isnan(out["alpha_operator"])
  assert out["q_hash_at_boxed"] == pytest.approx(0.4 * 0.7)  # q(####) = α·r(####) where y = boxed


def test_verdict_calls_a_difference_only_beyond_two_standard_errors():
  def run(p, n=100):
    return {"eval": {"strict_pass@1": p, "strict_pass@1_se": math.sqrt(p * (1 - p) / n)}}
  assert "V-Pretraining better" in train.verdict(run(0.30), run(0.10))
  assert "no difference beyond noise" in train.verdict(run(0.12), run(0.10))
  assert "NTP better" in train.verdict(run(0.05), run(0.30))
  se = math.hypot(math.sqrt(0.3 * 0.7 / 100), math.sqrt(0.1 * 0.9 / 100))
  assert f"+0.200 ± {se:.3f}" in train.verdict(run(0.30), run(0.10))
