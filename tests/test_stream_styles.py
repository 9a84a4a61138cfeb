"""The mismatched continued-pretraining stream: answer style, corrupted facts, wrong final answers."""

import pytest

from vpt.language.data import synthetic_math as sm

N = 3000


def _pairs(style, n=N, seed=0):
  clean, styled = sm.SyntheticMath(seed, n), sm.SyntheticMath(seed, n, style=style)
  return [(clean[i], styled[i]) for i in range(n)]


def _true_facts(answer):
  return [(a, op, b, c, sm.evaluate(a, op, b)) for a, op, b, c in sm.extract_equations(answer)]


def test_default_style_is_the_clean_stream_and_every_style_keeps_the_problem():
  assert all(c == s for c, s in _pairs(sm.StreamStyle(), n=300))
  style = sm.StreamStyle(downstream_format_fraction=0.5, corrupt_fact_rate=0.5, wrong_final_fraction=0.5)
  pairs = _pairs(style, n=300)
  assert all(c["question"] == s["question"] for c, s in pairs)  # paired: same problem, other targets
  assert sum(c["answer"] != s["answer"] for c, s in pairs) > 200
  assert sm.SyntheticMath(0, 300, style=style)[17] == pairs[17][1]  # still a function of (seed, i)


def test_answer_style_share_and_form():
  pairs = _pairs(sm.StreamStyle(downstream_format_fraction=0.3))
  in_format = 0
  for clean, styled in pairs:
    body, _, last = styled["answer"].rpartition("\n")
    assert body == clean["answer"].rpartition("\n")[0]  # only the final line changes
    result = sm.final_answer(clean["answer"])
    if last.startswith("#### "):
      in_format += 1
      assert last == f"#### {result}"
    else:
      assert last == f"$\\boxed{{{result}}}$" and sm.final_answer(styled["answer"]) is None
  assert 0.27 < in_format / N < 0.33  # binomial sd at N=3000: 0.008


@pytest.mark.parametrize("mode", ["random", "systematic"])
def test_corrupted_facts_only_for_the_chosen_ops_at_the_chosen_rate(mode):
  pairs = _pairs(sm.StreamStyle(corrupt_fact_rate=0.4, corrupt_ops="*+", corrupt_mode=mode))
  wrong = {op: 0 for op in "+-*/"}
  total = dict(wrong)
  for clean, styled in pairs:
    assert sm.final_answer(styled["answer"]) == sm.final_answer(clean["answer"])  # the final answer stays right
    clean_facts = sm.extract_equations(clean["answer"])
    for (a, op, b, c, true), clean_fact in zip(_true_facts(styled["answer"]), clean_facts):
      assert (a, op, b) == clean_fact[:3]  # operands unchanged: later steps use the true value
      total[op] += 1
      if c != true:
        wrong[op] += 1
        assert c == true + 1 if mode == "systematic" else len(str(abs(c))) == len(str(abs(true)))
  assert wrong["-"] == 0 and wrong["/"] == 0 and total["-"] > 500 and total["/"] > 200
  for op in "*+":
    assert 0.35 < wrong[op] / total[op] < 0.45, (op, wrong[op], total[op])


def test_wrong_final_answer_after_correct_steps():
  pairs = _pairs(sm.StreamStyle(wrong_final_fraction=0.2))
  wrong = 0
  for clean, styled in pairs:
    assert all(c == true for _, _, _, c, true in _true_facts(styled["answer"]))
    final, result = sm.final_answer(styled["answer"]), sm.final_answer(clean["answer"])
    assert final is not None
    wrong += final != result
  assert 0.17 < wrong / N < 0.23  # binomial sd 0.007


@pytest.mark.parametrize("kwargs, field", [
    ({"downstream_format_fraction": 1.5}, "downstream_format_fraction"),
    ({"corrupt_fact_rate": -0.1}, "corrupt_fact_rate"),
    ({"wrong_final_fraction": 2.0}, "wrong_final_fraction"),
    ({"corrupt_ops": "x"}, "corrupt_ops"),
    ({"corrupt_mode": "sometimes"}, "corrupt_mode"),
])
def test_bad_styles_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    sm.StreamStyle(**kwargs)


def test_the_configured_training_stream_has_the_style_and_eval_stays_clean():
  from vpt.language import config_lib
  from vpt.core import config as core_config
  from vpt.language.data import sources
  config = core_config.with_overrides(config_lib.base_config(), {
      "data.synthetic.downstream_format_fraction": 0.0, "data.synthetic.wrong_final_fraction": 1.0})
  config_lib.validate(config)
  train = sources.make_source(config.data, "train")
  answers = [train[i]["answer"] for i in range(50) if "answer" in train[i]]
  assert answers and all(a.rpartition("\n")[2].startswith("$\\boxed{") for a in answers)
  heldout = sources.make_source(config.data, "eval")
  assert all(heldout[i]["answer"].rpartition("\n")[2].startswith("#### ") for i in range(50))
  bad = core_config.with_overrides(config_lib.base_config(), {"data.synthetic.corrupt_mode": "often"})
  with pytest.raises(ValueError, match=r"config\.data\.synthetic\.corrupt_mode='often'"):
    config_lib.validate(bad)


def test_the_answer_format_decision_is_one_token_after_the_line_break():
  """BPE merged '.\\n####' into one piece: the format decision sat in the line break that ends every
  step. With the answer markers as pieces of their own, the token after a step's line break is the
  decision: '####', '$\\boxed{', or the next step's first word."""
  from vpt.language.data import tokenizer as tok_lib
  data = sm.SyntheticMath(1, 2000, irrelevant_fraction=0.3, style=sm.StreamStyle(downstream_format_fraction=0.3))
  texts = [r.get("text") or sm.format_prompt(r["question"]) + sm.ANSWER_SEP + r["answer"]
           for r in (data[i] for i in range(len(data)))]
  tok = tok_lib.SentencePieceTokenizer(model_proto=tok_lib.train_sentencepiece(texts, 1024))
  for final in ("#### 42", "$\\boxed{42}$"):
    pieces = [tok.id_to_piece(i) for i in tok.encode(f"3 * 5 = 15 dollars.\n{final}")]
    marker = final[:final.index("4")].strip()
    assert marker in pieces and pieces[pieces.index(marker) - 1].endswith("\n"), pieces
    assert tok.decode(tok.encode(f"x.\n{final}")) == f"x.\n{final}"
