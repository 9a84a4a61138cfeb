"""Embedded default dataset: seeded, random-access GSM8K-style arithmetic problems.

Record `i` of `SyntheticMath(seed, ...)` depends only on `(seed, i)`, so any index
can be regenerated without touching the others (no files, no download).

Math records are `{"question": str, "answer": str}`; the answer is a worked,
multi-step solution in GSM8K format: one reasoning step per line, each holding
exactly one binary arithmetic fact written `a op b = c` (op in + - * /), and a
last line `#### <integer>`. Keeping every fact in that one form lets a later
experiment measure arithmetic *skill* (per-operation accuracy of the facts a
model writes, see `extract_equations`) and not only the answer format.

With probability `irrelevant_fraction` a record is instead off-domain filler
prose, `{"text": str}`, standing in for irrelevant data in the stream.

A `StreamStyle` makes the continued-pretraining stream *mismatch* the downstream
task, as NuminaMath-CoT differs from GSM8K (V-Pretraining can only help where
the stream's one-hot targets are not already the downstream's best targets):
  - answer style: only `downstream_format_fraction` of solutions end `#### N`;
    the rest end NuminaMath's `$\\boxed{N}$` (the final-answer decision is the
    first token of the last line: `####` or `$\\boxed{`, each a piece of its own
    in the trained tokenizer, see `tokenizer.ANSWER_MARKERS`);
  - corrupted facts: each written result `c` of an `a op b = c` step whose op is
    in `corrupt_ops` is wrong with probability `corrupt_fact_rate` — 'random'
    (another number of the same digit count) or 'systematic' (c + 1, a rule a
    learner can pick up); later steps still use the true value;
  - a wrong final answer after correct steps (`wrong_final_fraction`): a copy
    error the learner can tell apart from a right target, since the number to
    copy stands one line above.
Style draws come from their own random stream keyed by (seed, i), so a record's
problem is the same under every style (paired comparisons), and the default
style reproduces the clean records exactly. Feedback, validation and test sets
always use the clean default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zlib

import numpy as np

# The prompt template; the answer follows after ANSWER_SEP. A single space (and
# not a newline) keeps the first answer token distinct from the line breaks
# inside the solution.
PROMPT_TEMPLATE = "Question: {q}\nAnswer:"
ANSWER_SEP = " "

# One problem in `_HOLDOUT_BUCKETS` (by a hash of the question text) is reserved
# for the 'eval' partition, so the eval split never repeats a training question.
# 'validation' and 'test' split that bucket in two (by a second hash), so design choices made on
# validation problems never see a test question.
_HOLDOUT_BUCKETS = 8
_PARTITIONS = ("all", "train", "eval", "validation", "test")

_FINAL_RE = re.compile(r"####\s*(-?[\d,]+)\s*$")
_EQ_RE = re.compile(r"(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)")


def format_prompt(question: str) -> str:
  """The prompt a model sees; the target is ANSWER_SEP + answer."""
  return PROMPT_TEMPLATE.format(q=question)


def final_answer(answer_text: str) -> int | None:
  """The integer after the last `####` (GSM8K convention), or None."""
  m = _FINAL_RE.search(answer_text.strip())
  if m is None:
    return None
  try:
    return int(m.group(1).replace(",", ""))
  except ValueError:
    return None


def extract_equations(text: str) -> list[tuple[int, str, int, int]]:
  """All `a op b = c` facts in `text`, as (a, op, b, c) (c as written)."""
  return [(int(a), op, int(b), int(c)) for a, op, b, c in _EQ_RE.findall(text)]


def evaluate(a: int, op: str, b: int) -> int | None:
  """Exact integer value of `a op b` (None for a non-integer division)."""
  if op == "+":
    return a + b
  if op == "-":
    return a - b
  if op == "*":
    return a * b
  if b == 0 or a % b:
    return None
  return a // b


class _Draw:
  """Fast scalar draws from one pre-sampled block of uniforms."""

  def __init__(self, rng: np.random.Generator):
    self._rng = rng
    self._u = rng.random(64).tolist()
    self._k = 0

  def _next(self) -> float:
    if self._k == len(self._u):
      self._u = self._rng.random(64).tolist()
      self._k = 0
    self._k += 1
    return self._u[self._k - 1]

  def int(self, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return lo + min(int(self._next() * (hi - lo + 1)), hi - lo)

  def choice(self, seq):
    return seq[self.int(0, len(seq) - 1)]

  def chance(self, p: float) -> bool:
    return self._next() < p

  def distinct(self, seq, n: int):
    """n different elements of seq."""
    out = []
    while len(out) < n:
      x = self.choice(seq)
      if x not in out:
        out.append(x)
    return out


# --- vocabulary -----------------------------------------------------------------

_PEOPLE = [  # (name, subject, object/possessive)
    ("Tom", "he", "his"), ("Mia", "she", "her"), ("Sam", "he", "his"),
    ("Lena", "she", "her"), ("Omar", "he", "his"), ("Ava", "she", "her"),
    ("Raj", "he", "his"), ("Zoe", "she", "her"), ("Leo", "he", "his"),
    ("Nina", "she", "her"), ("Ben", "he", "his"), ("Ivy", "she", "her"),
    ("Carlos", "he", "his"), ("Ana", "she", "her"), ("Kenji", "he", "his"),
    ("Sara", "she", "her"), ("Max", "he", "his"), ("Emma", "she", "her"),
    ("Noah", "he", "his"), ("Lily", "she", "her"), ("Ali", "he", "his"),
    ("Rosa", "she", "her"), ("Jack", "he", "his"), ("Maya", "she", "her"),
]
_THINGS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards",
           "shells", "balloons", "toy cars", "oranges", "stamps", "crayons", "beads",
           "coins", "buttons", "cupcakes", "erasers", "flowers", "candies"]
_CONTAINERS = ["boxes", "bags", "jars", "baskets", "packs", "crates", "trays"]
_SHOP_ITEMS = ["notebooks", "pens", "apples", "sandwiches", "toys", "socks", "mugs",
               "candles", "plates", "tickets", "muffins", "rulers", "hats",
               "comics"]
_BIG_ITEMS = ["jacket", "bike", "lamp", "backpack", "game", "pair of shoes", "watch",
              "chair", "guitar", "tent"]
_MACHINES = [("machine", "toys"), ("bakery", "loaves of bread"), ("printer", "pages"),
             ("factory", "bottles"), ("robot", "boxes"), ("farm", "eggs")]
_VEHICLES = ["car", "train", "bus", "truck", "boat"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]


def _cap(s: str) -> str:
  return s[:1].upper() + s[1:]


def _eq(a: int, op: str, b: int) -> tuple[str, int]:
  """Formats one arithmetic fact and returns it with its value."""
  c = evaluate(a, op, b)
  assert c is not None, (a, op, b)
  return f"{a} {op} {b} = {c}", c


# --- problem templates ------------------------------------------------------------
# Each returns (question, solution lines, final answer). Every computed number in
# a solution comes from `_eq`, so the facts are correct by construction.


def _shopping(d: _Draw):
  (n, s, _), (i1, i2) = d.choice(_PEOPLE), d.distinct(_SHOP_ITEMS, 2)
  a, p, b, q = d.int(2, 9), d.int(2, 15), d.int(2, 9), d.int(2, 15)
  e1, x = _eq(a, "*", p)
  e2, y = _eq(b, "*", q)
  e3, t = _eq(x, "+", y)
  question = (f"{n} buys {a} {i1} for ${p} each and {b} {i2} for ${q} each. "
              f"How much money does {s} spend in total?")
  lines = [f"The {i1} cost {e1} dollars.", f"The {i2} cost {e2} dollars.",
           f"{_cap(s)} spends {e3} dollars."]
  if d.chance(0.4):  # Optional coupon: a fourth step.
    c = d.int(1, min(9, t - 1))
    e4, t = _eq(t, "-", c)
    question = question.replace(". How", f". {_cap(s)} uses a ${c} coupon. How")
    lines.append(f"So {s} pays {e4} dollars.")
  return question, lines, t


def _change(d: _Draw):
  (n, s, _), item = d.choice(_PEOPLE), d.choice(_SHOP_ITEMS)
  a, p, r = d.int(2, 9), d.int(2, 12), d.int(1, 40)
  e1, cost = _eq(a, "*", p)
  m = cost + r
  e2, left = _eq(m, "-", cost)
  question = (f"{n} has ${m}. {_cap(s)} buys {a} {item} that cost ${p} each. "
              f"How much money does {s} have left?")
  return question, [f"The {item} cost {e1} dollars.", f"{_cap(s)} has {e2} dollars left."], left


def _sharing(d: _Draw):
  (n, s, _), cont, thing = d.choice(_PEOPLE), d.choice(_CONTAINERS), d.choice(_THINGS)
  a, b = d.int(2, 9), d.int(2, 12)
  e1, total = _eq(a, "*", b)
  k = d.choice([x for x in range(2, 13) if total % x == 0 and x != total])
  e2, each = _eq(total, "/", k)
  question = (f"{n} has {a} {cont} with {b} {thing} in each. {_cap(s)} shares all the "
              f"{thing} equally among {k} friends. How many {thing} does each friend get?")
  lines = [f"{_cap(s)} has {e1} {thing}.", f"Each friend gets {e2} {thing}."]
  return question, lines, each


def _rate(d: _Draw):
  place, product = d.choice(_MACHINES)
  r = d.int(3, 25)
  day1, day2 = d.distinct(_DAYS, 2)
  h, g = d.int(2, 9), d.int(2, 9)
  question = (f"A {place} makes {r} {product} per hour. It works {h} hours on {day1} "
              f"and {g} hours on {day2}. How many {product} does it make on the two days?")
  if d.chance(0.5):
    e1, x = _eq(r, "*", h)
    e2, y = _eq(r, "*", g)
    e3, t = _eq(x, "+", y)
    lines = [f"On {day1} it makes {e1} {product}.", f"On {day2} it makes {e2} {product}.",
             f"Together that is {e3} {product}."]
  else:
    e1, hours = _eq(h, "+", g)
    e2, t = _eq(r, "*", hours)
    lines = [f"It works {e1} hours.", f"It makes {e2} {product}."]
  return question, lines, t


def _reading(d: _Draw):
  (n, s, p), rate, days = d.choice(_PEOPLE), d.int(3, 30), d.int(2, 12)
  pages = rate * days
  if d.chance(0.5):
    e1, t = _eq(pages, "/", rate)
    question = (f"{n} reads {rate} pages every day. {_cap(p)} book has {pages} pages. "
                f"How many days does {s} need to finish it?")
    return question, [f"{_cap(s)} needs {e1} days."], t
  read = d.int(1, days - 1)
  e1, done = _eq(rate, "*", read)
  e2, t = _eq(pages, "-", done)
  question = (f"A book has {pages} pages. {n} reads {rate} pages a day for {read} days. "
              f"How many pages are left to read?")
  return question, [f"{_cap(s)} has read {e1} pages.", f"There are {e2} pages left."], t


def _ages(d: _Draw):
  (a_n, _, _), (b_n, _, _), (c_n, _, _) = d.distinct(_PEOPLE, 3)
  a, b = d.int(3, 40), d.int(2, 15)
  e1, bb = _eq(a, "+", b)
  c = d.int(1, bb - 1)
  e2, cc = _eq(bb, "-", c)
  question = (f"{a_n} is {a} years old. {b_n} is {b} years older than {a_n}. "
              f"{c_n} is {c} years younger than {b_n}.")
  lines = [f"{b_n} is {e1} years old.", f"{c_n} is {e2} years old."]
  if d.chance(0.5):
    e3, s1 = _eq(a, "+", bb)
    e4, t = _eq(s1, "+", cc)
    question += " What is the sum of their three ages?"
    lines += [f"{a_n} and {b_n} are {e3} years old together.",
              f"All three are {e4} years old together."]
  else:
    t = cc
    question += f" How old is {c_n}?"
  return question, lines, t


def _chain(d: _Draw):
  (n, s, p), (f_n, _, _) = d.distinct(_PEOPLE, 2)
  thing = d.choice(_THINGS)
  a, b = d.int(5, 40), d.int(2, 30)
  e1, x = _eq(a, "+", b)
  c = d.int(1, x - 1)
  e2, y = _eq(x, "-", c)
  question = (f"{n} has {a} {thing}. {_cap(s)} finds {b} more, then gives {c} to {f_n}.")
  lines = [f"{_cap(s)} has {e1} {thing}.", f"Then {s} has {e2} {thing}."]
  t = y
  if d.chance(0.6):
    k, m = d.int(2, 6), d.int(2, 10)
    e3, z = _eq(k, "*", m)
    e4, t = _eq(y, "+", z)
    question += f" Then {s} buys {k} packs with {m} {thing} in each."
    lines += [f"The packs hold {e3}.", f"Now {s} has {e4} {thing}."]
  question += f" How many {thing} does {n} have now?"
  return question, lines, t


def _percent(d: _Draw):
  (n, _, _), item = d.choice(_PEOPLE), d.choice(_BIG_ITEMS)
  k = d.choice([10, 20, 25, 30, 40, 50, 60, 75])
  g = math.gcd(k, 100)
  div, mult = 100 // g, k // g
  price = div * d.int(2, 20)
  e1, unit = _eq(price, "/", div)
  lines = []
  if mult == 1:
    discount = unit
    lines.append(f"{k}% of {price} is {e1} dollars.")
  else:
    e2, discount = _eq(unit, "*", mult)
    lines += [f"{100 // div}% of {price} is {e1} dollars.",
              f"So {k}% of {price} is {e2} dollars."]
  e3, t = _eq(price, "-", discount)
  lines.append(f"The sale price is {e3} dollars.")
  question = (f"A {item} costs ${price}. It is on sale for {k}% off. "
              f"How much does {n} pay for the {item} on sale?")
  return question, lines, t


def _compare(d: _Draw):
  (a_n, _, _), (b_n, _, _) = d.distinct(_PEOPLE, 2)
  thing = d.choice(_THINGS)
  a, da, b, db = d.int(2, 12), d.int(2, 9), d.int(2, 12), d.int(2, 9)
  while a * da == b * db:
    db += 1
  e1, x = _eq(a, "*", da)
  e2, y = _eq(b, "*", db)
  question = (f"{a_n} collects {a} {thing} a day for {da} days. {b_n} collects {b} "
              f"{thing} a day for {db} days.")
  lines = [f"{a_n} collects {e1} {thing}.", f"{b_n} collects {e2} {thing}."]
  if x > y:
    e3, t = _eq(x, "-", y)
    hi, lo = a_n, b_n
  else:
    e3, t = _eq(y, "-", x)
    hi, lo = b_n, a_n
  question += f" How many more {thing} does {hi} collect than {lo}?"
  lines.append(f"{hi} collects {e3} more {thing}.")
  return question, lines, t


def _fraction(d: _Draw):
  (n, s, _), thing = d.choice(_PEOPLE), d.choice(_THINGS)
  k = d.int(2, 6)
  total = k * d.int(2, 12)
  e1, given = _eq(total, "/", k)
  e2, left = _eq(total, "-", given)
  word = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth", 6: "a sixth"}[k]
  question = f"{n} has {total} {thing}. {_cap(s)} gives {word} of them to a friend."
  lines = [f"{_cap(s)} gives away {e1} {thing}.", f"{_cap(s)} keeps {e2} {thing}."]
  t = left
  if left > 1 and d.chance(0.5):
    m = d.int(1, left - 1)
    e3, t = _eq(left, "-", m)
    question += f" Then {s} loses {m}."
    lines.append(f"After losing some, {s} has {e3} {thing}.")
  question += f" How many {thing} does {s} have now?"
  return question, lines, t


def _distance(d: _Draw):
  (n, s, _), vehicle = d.choice(_PEOPLE), d.choice(_VEHICLES)
  v, h, w = d.int(10, 80), d.int(2, 6), d.int(2, 30)
  e1, x = _eq(v, "*", h)
  e2, t = _eq(x, "+", w)
  question = (f"{n} goes by {vehicle} at {v} km per hour for {h} hours, then walks "
              f"{w} km. How many km does {s} travel in total?")
  return question, [f"The {vehicle} ride is {e1} km.", f"In total {s} travels {e2} km."], t


def _savings(d: _Draw):
  (n, s, _), item = d.choice(_PEOPLE), d.choice(_BIG_ITEMS)
  a, w = d.int(2, 20), d.int(2, 10)
  e1, saved = _eq(a, "*", w)
  if d.chance(0.5):
    g = d.int(2, 40)
    e2, saved2 = _eq(saved, "+", g)
    b = d.int(1, saved2 - 1)
    e3, t = _eq(saved2, "-", b)
    question = (f"{n} saves ${a} every week for {w} weeks. {_cap(s)} also gets ${g} as "
                f"a gift. Then {s} buys a {item} for ${b}. How much money does {s} have left?")
    lines = [f"{_cap(s)} saves {e1} dollars.", f"With the gift {s} has {e2} dollars.",
             f"After the {item}, {s} has {e3} dollars left."]
  else:
    b = d.int(1, saved - 1)
    e2, t = _eq(saved, "-", b)
    question = (f"{n} saves ${a} every week for {w} weeks. Then {s} buys a {item} for "
                f"${b}. How much money does {s} have left?")
    lines = [f"{_cap(s)} saves {e1} dollars.", f"{_cap(s)} has {e2} dollars left."]
  return question, lines, t


def _groups(d: _Draw):
  g, n = d.int(2, 9), d.int(3, 12)
  e1, total = _eq(g, "*", n)
  k = d.int(1, total - 1)
  e2, t = _eq(total, "-", k)
  question = (f"A class has {g} tables with {n} students at each table. {k} students go "
              f"home early. How many students are still in the class?")
  return question, [f"There are {e1} students.", f"{e2} students are still there."], t


TEMPLATES = (_shopping, _change, _sharing, _rate, _reading, _ages, _chain, _percent,
             _compare, _fraction, _distance, _savings, _groups)

# --- off-domain filler ------------------------------------------------------------

_FILLER = (
    ("The weather in {city} was {adj} today.", "A {adj2} wind came from the {dir}.",
     "People stayed near the {place} until the evening.", "Tomorrow should be {adj3}."),
    ("{name} took the {vehicle} to {city}.", "The trip went past {adj} fields and a {adj2} river.",
     "{name} had lunch at a small cafe near the {place}.", "The streets were quiet and {adj3}."),
    ("To make {dish}, start by washing the {veg}.", "Cook it slowly with a little {spice}.",
     "Let it rest before serving it with fresh {herb}.", "It tastes best when it is {adj3}."),
    ("The old {place} in {city} opened in spring.", "Visitors walk along the {adj} paths.",
     "{name} likes the {adj2} garden behind it.", "In the evening the lights make it look {adj3}."),
)
_FILL = {
    "city": ["Lisbon", "Oslo", "Kyoto", "Lima", "Cairo", "Dublin", "Quebec", "Hanoi"],
    "adj": ["cloudy", "bright", "green", "quiet", "cold", "warm", "misty", "long"],
    "adj2": ["gentle", "strong", "wide", "calm", "narrow", "small", "cool", "old"],
    "adj3": ["sunny", "pleasant", "busy", "peaceful", "lovely", "fresh", "crisp"],
    "dir": ["north", "south", "east", "west", "sea", "hills"],
    "place": ["harbor", "market", "station", "museum", "park", "library", "bridge"],
    "name": [p[0] for p in _PEOPLE],
    "vehicle": ["train", "bus", "ferry", "tram"],
    "dish": ["soup", "a stew", "rice", "a salad", "bread", "a curry"],
    "veg": ["carrots", "onions", "potatoes", "beans", "leeks", "peppers"],
    "spice": ["salt", "pepper", "cumin", "butter", "olive oil", "garlic"],
    "herb": ["parsley", "basil", "mint", "dill", "thyme"],
}
_FILL_RE = re.compile(r"\{(\w+)\}")


def _filler(d: _Draw) -> str:
  sentences = d.choice(_FILLER)
  n = d.int(2, len(sentences))
  values = {k: d.choice(v) for k, v in _FILL.items()}
  return " ".join(_FILL_RE.sub(lambda m: values[m.group(1)], s) for s in sentences[:n])


# --- stream styles (mismatch with the downstream) ------------------------------------

CORRUPT_MODES = ("random", "systematic")
# NuminaMath-CoT's boxed final answer. Its first piece ('$\boxed{', a tokenizer symbol of its own, as
# '####' is) starts no other line, so the answer-format decision is one token after a line break.
OTHER_ANSWER_STYLE = "$\\boxed{{{}}}$"
_STYLE_STREAM = 0x5757  # salt of the style draws' random stream (kept apart from the problem's).


@dataclasses.dataclass(frozen=True)
class StreamStyle:
  """How a stream departs from the clean downstream format; the default departs in nothing."""
  downstream_format_fraction: float = 1.0  # share of solutions ending '#### N' (else '$\boxed{N}$')
  corrupt_fact_rate: float = 0.0  # per written fact result, for ops in corrupt_ops
  corrupt_ops: str = "+-*/"
  corrupt_mode: str = "random"  # 'random' | 'systematic'
  wrong_final_fraction: float = 0.0  # share of solutions whose final answer is not the last step's result

  def __post_init__(self):
    for name in ("downstream_format_fraction", "corrupt_fact_rate", "wrong_final_fraction"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name}={getattr(self, name)}: expected in [0, 1]")
    if not set(self.corrupt_ops) <= set("+-*/"):
      raise ValueError(f"corrupt_ops={self.corrupt_ops!r}: expected a subset of '+-*/'")
    if self.corrupt_mode not in CORRUPT_MODES:
      raise ValueError(f"corrupt_mode={self.corrupt_mode!r}: expected one of {CORRUPT_MODES}")

  @classmethod
  def from_config(cls, synthetic) -> "StreamStyle":
    """The style of a config's `data.synthetic` (fields a config written before them lacks keep their
    defaults, the ones above)."""
    return cls(**{f.name: synthetic[f.name] for f in dataclasses.fields(cls) if f.name in synthetic})

  @property
  def is_clean(self) -> bool:
    return self == StreamStyle()


def _wrong_number(d: _Draw, c: int) -> int:
  """A number of the same digit count as c (and sign), never c."""
  digits = len(str(abs(c)))
  lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
  w = d.int(lo, hi - 1)
  w = w + 1 if w >= abs(c) else w  # uniform over [lo, hi] without |c|
  return -w if c < 0 else w


def _styled(lines: list[str], result: int, style: StreamStyle, d: _Draw) -> tuple[list[str], str]:
  """(solution lines with corrupted facts, final line) under `style`."""
  if style.corrupt_fact_rate > 0:
    def corrupt(m: re.Match) -> str:
      a, op, b, c = m.group(1), m.group(2), m.group(3), int(m.group(4))
      if op in style.corrupt_ops and d.chance(style.corrupt_fact_rate):
        c = c + 1 if style.corrupt_mode == "systematic" else _wrong_number(d, c)
      return f"{a} {op} {b} = {c}"
    lines = [_EQ_RE.sub(corrupt, line) for line in lines]
  final = _wrong_number(d, result) if d.chance(style.wrong_final_fraction) else result
  in_format = d.chance(style.downstream_format_fraction)
  return lines, f"#### {final}" if in_format else OTHER_ANSWER_STYLE.format(final)


# --- the dataset ------------------------------------------------------------------


def _bucket(question: str) -> int:
  return zlib.crc32(question.encode("utf-8")) % _HOLDOUT_BUCKETS


def _in_partition(question: str, partition: str) -> bool:
  if partition == "all":
    return True
  held_out = _bucket(question) == 0
  if partition == "train":
    return not held_out
  if partition == "eval":
    return held_out
  is_test = zlib.crc32(b"test/" + question.encode("utf-8")) % 2 == 0
  return held_out and is_test == (partition == "test")


class SyntheticMath:
  """Random-access, seeded GSM8K-style problems (record i depends on (seed, i) only).

  partition: 'all' (no filtering), 'train' (never yields a question of the
  held-out hash bucket) or 'eval' (only that bucket): train and eval built from
  any seeds never share a math question. 'validation' and 'test' are the two
  disjoint halves of 'eval'.
  """

  def __init__(self, seed: int, size: int, irrelevant_fraction: float = 0.0,
               partition: str = "all", style: StreamStyle = StreamStyle()):
    if seed < 0:
      raise ValueError(f"SyntheticMath seed={seed}: expected >= 0")
    if size <= 0:
      raise ValueError(f"SyntheticMath size={size}: expected > 0")
    if not 0.0 <= irrelevant_fraction <= 1.0:
      raise ValueError(f"irrelevant_fraction={irrelevant_fraction}: expected in [0, 1]")
    if partition not in _PARTITIONS:
      raise ValueError(f"partition={partition!r}: expected one of {_PARTITIONS}")
    self.seed, self.size = int(seed), int(size)
    self.irrelevant_fraction = float(irrelevant_fraction)
    self.partition = partition
    self.style = style

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, i: int) -> dict[str, str]:
    i = int(i)
    if not 0 <= i < self.size:
      raise IndexError(f"SyntheticMath index {i} out of range [0, {self.size})")
    attempt = 0
    while True:
      key = [self.seed, i] if attempt == 0 else [self.seed, i, attempt]
      d = _Draw(np.random.default_rng(key))
      if self.irrelevant_fraction and d.chance(self.irrelevant_fraction):
        return {"text": _filler(d)}
      question, lines, result = d.choice(TEMPLATES)(d)
      if _in_partition(question, self.partition):
        final = f"#### {result}"
        if not self.style.is_clean:
          lines, final = _styled(lines, result, self.style, _Draw(np.random.default_rng(key + [_STYLE_STREAM])))
        return {"question": question, "answer": "\n".join(lines) + "\n" + final}
      attempt += 1  # Rejected by the partition: redraw, still a function of (seed, i).


def write_gsm8k_jsonl(path: str, seed: int, size: int, partition: str = "all") -> str:
  """Writes `size` math records as GSM8K-style {"question", "answer"} jsonl."""
  data = SyntheticMath(seed, size, partition=partition)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for i in range(size):
      f.write(json.dumps(data[i]) + "\n")
  os.replace(tmp, path)  # Readers never see a half-written file.
  return path
