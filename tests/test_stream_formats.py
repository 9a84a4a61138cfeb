"""Record formats (parquet, datasets.save_to_disk Arrow, array_record, jsonl.gz / .zst) and
weighted mixtures: same batches as plain jsonl, bounded start-up work, exact resume, clear errors."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import CharTokenizer, assert_batches_equal, packed_segments

from vpt.core import config as core_config
from vpt.language import config_lib
from vpt.language.data import pipeline, sources


def _cfg(**overrides):
  c = config_lib.data_config()
  for k, v in overrides.items():
    c[k] = v
  return c


def _rows(n=30, tag="P"):
  """NuminaMath-CoT-like rows: problem / solution strings, a messages list and an int column."""
  rng = np.random.default_rng(0)
  rows = []
  for i in range(n):
    words = " ".join(["apple", "pear", "plum"][j % 3] for j in range(int(rng.integers(1, 9))))
    rows.append({"problem": f"{tag}{i}: what is {i} plus {words}?", "solution": f"It is {i + 1}.",
                 "messages": [{"role": "user", "content": f"q{i}"}], "id": i})
  return rows


def _jsonl_bytes(rows):
  return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _write_jsonl(path, rows):
  path.write_bytes(_jsonl_bytes(rows))
  return str(path)


def _write_parquet(dir_, rows, n_files=2, row_group_size=4):
  """`n_files` parquet files (sorted names in record order) of small row groups."""
  dir_.mkdir(parents=True, exist_ok=True)
  for k, part in enumerate(np.array_split(np.arange(len(rows)), n_files)):
    pq.write_table(pa.Table.from_pylist([rows[i] for i in part]),
                   dir_ / f"train-{k:05d}-of-{n_files:05d}.parquet", row_group_size=row_group_size)
  return str(dir_ / "*.parquet")


def _write_hf_disk(path, rows, num_shards=2):
  """A real `datasets.save_to_disk` directory (Arrow stream files + state.json)."""
  import datasets
  datasets.Dataset.from_list(rows).save_to_disk(str(path), num_shards=num_shards)
  return str(path)


def _write_array_record(path, rows):
  from array_record.python.array_record_module import ArrayRecordWriter
  w = ArrayRecordWriter(str(path), "group_size:1")
  for r in rows:
    w.write(json.dumps(r).encode())
  w.close()
  return str(path)


def _write_gz(path, rows):
  path.write_bytes(gzip.compress(_jsonl_bytes(rows)))
  return str(path)


def _write_zst(path, rows):
  path.write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(rows)))
  return str(path)


FORMATS = ("parquet", "arrow", "array_record", "jsonl.gz", "jsonl.zst")


def _write_format(fmt, tmp_path, rows):
  """(data.source, data.train_path) of `rows` in format `fmt`."""
  if fmt == "parquet":
    return "parquet", _write_parquet(tmp_path / "pq", rows)
  if fmt == "arrow":
    return "arrow", _write_hf_disk(tmp_path / "hf", rows)
  if fmt == "array_record":
    return "array_record", _write_array_record(tmp_path / "r.array_record", rows)
  if fmt == "jsonl.gz":
    return "jsonl", _write_gz(tmp_path / "r.jsonl.gz", rows)
  return "jsonl", _write_zst(tmp_path / "r.jsonl.zst", rows)


def _texts(tok, batches):
  return [tok.decode(np.concatenate([i, t[-1:]])[1:-1]) for i, t, _ in packed_segments(batches)]


def _iter(cfg, split="train", batch=2, seq_len=128, seed=0, **kw):
  return pipeline.make_lm_iterator(cfg, CharTokenizer(), split=split, global_batch_size=batch,
                                   seq_len=seq_len, seed=seed, **kw)


@pytest.fixture(autouse=True)
def _fresh_source_cache():
  sources._CACHE.clear()
  yield
  sources._CACHE.clear()


# --- every format is the same data ------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_yields_the_batches_of_plain_jsonl(fmt, tmp_path):
  rows = _rows()
  ref_path = _write_jsonl(tmp_path / "ref.jsonl", rows)
  kind, path = _write_format(fmt, tmp_path, rows)
  qa = dict(prompt_field="problem", answer_field="solution")
  ref = _cfg(source="jsonl", train_path=ref_path, eval_path=ref_path, **qa)
  cfg = _cfg(source=kind, train_path=path, eval_path=path, cache_dir=str(tmp_path / "cache"), **qa)
  src = sources.make_source(cfg, "train")
  assert len(src) == 30
  assert [src[i] for i in range(30)] == [{"prompt": r["problem"], "answer": r["solution"]}
                                         for r in rows]
  # Shuffled training batches (across epochs) and the one padded eval pass are identical.
  ours, theirs = _iter(cfg), _iter(ref)
  assert_batches_equal([next(ours) for _ in range(25)], [next(theirs) for _ in range(25)])
  assert_batches_equal(list(_iter(cfg, "eval")), list(_iter(ref, "eval")))
  # Text mode reads the same column from every format.
  text = sources.make_source(_cfg(source=kind, train_path=path, text_field="problem",
                                  cache_dir=str(tmp_path / "cache")), "train")
  assert [text[i] for i in (0, 29)] == [{"text": rows[0]["problem"]}, {"text": rows[29]["problem"]}]


def test_describe_names_file_and_row(tmp_path):
  rows = _rows(10)
  qa = dict(prompt_field="problem", answer_field="solution", cache_dir=str(tmp_path / "c"))
  pq_glob = _write_parquet(tmp_path / "pq", rows)  # 5 + 5 rows
  src = sources.make_source(_cfg(source="parquet", train_path=pq_glob, **qa), "train")
  assert src.describe(7) == f"{tmp_path}/pq/train-00001-of-00002.parquet row 2"
  hf = _write_hf_disk(tmp_path / "hf", rows)
  src = sources.make_source(_cfg(source="arrow", train_path=hf, **qa), "train")
  assert src.describe(7) == f"{hf}/data-00001-of-00002.arrow row 2"
  (tmp_path / "g.jsonl").write_text(
      "\n".join(json.dumps(r) for r in rows[:3]) + "\n\n" + json.dumps(rows[3]) + "\n")
  gz = tmp_path / "g.jsonl.gz"
  gz.write_bytes(gzip.compress((tmp_path / "g.jsonl").read_bytes()))
  src = sources.make_source(_cfg(source="jsonl", train_path=str(gz), **qa), "train")
  assert len(src) == 4 and src.describe(3) == f"{gz}:5"  # The blank line 4 is skipped.


def test_datasetdict_directory_picks_the_split(tmp_path):
  import datasets
  rows = _rows(12)
  dd = datasets.DatasetDict(train=datasets.Dataset.from_list(rows[:8]),
                            test=datasets.Dataset.from_list(rows[8:]))
  dd.save_to_disk(str(tmp_path / "dd"))
  cfg = _cfg(source="arrow", train_path=str(tmp_path / "dd"), eval_path=str(tmp_path / "dd"),
             prompt_field="problem", answer_field="solution", eval_split="test")
  assert len(sources.make_source(cfg, "train")) == 8
  ev = sources.make_source(cfg, "eval")
  assert [ev[i]["prompt"] for i in range(4)] == [r["problem"] for r in rows[8:]]
  cfg.eval_split = "validation"
  with pytest.raises(ValueError, match=r"data.eval_path=.*DatasetDict without split 'validation'"
                                       r".*data.eval_split.*\['train', 'test'\]"):
    sources.make_source(cfg, "eval")


# --- start-up reads metadata, not records ------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_start_up_does_not_decode_every_record(fmt, tmp_path):
  rows = _rows(200)
  kind, path = _write_format(fmt, tmp_path, rows)
  cfg = _cfg(source=kind, train_path=path, prompt_field="problem", answer_field="solution",
             cache_dir=str(tmp_path / "cache"))
  if kind == "jsonl":  # Compressed: the first construction decompresses and checks once.
    sources.make_source(cfg, "train")
    sources._CACHE.clear()  # As a restarted process (or another host) sees it.
    assert len(list((tmp_path / "cache").iterdir())) == 1
  before = sources.STATS["records_decoded"]
  src = sources.make_source(cfg, "train")
  assert len(src) == 200
  assert sources.STATS["records_decoded"] - before <= 1
  # Plain jsonl, by contrast, checks every line on every construction.
  ref = _cfg(source="jsonl", train_path=_write_jsonl(tmp_path / "p.jsonl", rows),
             prompt_field="problem", answer_field="solution")
  before = sources.STATS["records_decoded"]
  sources.make_source(ref, "train")
  assert sources.STATS["records_decoded"] - before == 200


def test_jsonl_cache_is_keyed_by_the_file_and_built_by_process_0(tmp_path, monkeypatch):
  rows = _rows(20)
  gz = _write_gz(tmp_path / "d.jsonl.gz", rows)
  cfg = _cfg(source="jsonl", train_path=gz, prompt_field="problem", answer_field="solution")
  sources.make_source(cfg, "train")
  cache_dir = tmp_path / ".vpt_cache"  # Default: next to the data.
  first = sorted(os.listdir(cache_dir))
  assert len(first) == 1 and first[0].startswith("d.jsonl.gz.")
  # Another process finds process 0's file and reads it without building.
  sources._CACHE.clear()
  monkeypatch.setattr(sources, "_process_index", lambda: 1)

  def no_build(*a, **k):
    raise AssertionError("rebuilt although the cache exists")

  monkeypatch.setattr(sources, "_build_jsonl_cache", no_build)
  assert len(sources.make_source(cfg, "train")) == 20
  monkeypatch.undo()
  # A changed file gets a new cache file (the old one is not reused).
  _write_gz(tmp_path / "d.jsonl.gz", rows[:7])
  sources._CACHE.clear()
  assert len(sources.make_source(cfg, "train")) == 7
  assert len(os.listdir(cache_dir)) == 2
  # A process other than 0 waits for process 0's file; if it never comes (cache not shared
  # between hosts), it builds its own.
  sources._CACHE.clear()
  monkeypatch.setattr(sources, "_process_index", lambda: 1)
  monkeypatch.setattr(sources, "CACHE_WAIT_SECONDS", 0.05)
  monkeypatch.setattr(sources, "_CACHE_POLL_SECONDS", 0.01)
  other = _cfg(source="jsonl", train_path=gz, prompt_field="problem", answer_field="solution",
               cache_dir=str(tmp_path / "host1"))
  assert len(sources.make_source(other, "train")) == 7
  assert len(os.listdir(tmp_path / "host1")) == 1
  assert not [f for f in os.listdir(cache_dir) if ".tmp-" in f]
  # With data.cache_dir set, plain jsonl is cached too: a restart no longer checks every line.
  monkeypatch.undo()
  plain = _cfg(source="jsonl", train_path=_write_jsonl(tmp_path / "p.jsonl", rows),
               text_field="problem", cache_dir=str(tmp_path / "plain"))
  sources.make_source(plain, "train")
  sources._CACHE.clear()
  before = sources.STATS["records_decoded"]
  src = sources.make_source(plain, "train")
  assert sources.STATS["records_decoded"] - before <= 1 and len(os.listdir(tmp_path / "plain")) == 1
  assert [src[i] for i in range(20)] == [{"text": r["problem"]} for r in rows]


# --- mixtures -------------------------------------------------------------------------------


def _mixture_cfg(tmp_path, weights=(3.0, 1.0)):
  a = _write_jsonl(tmp_path / "a.jsonl", [{"text": f"A{i} " + "x" * (i % 5)} for i in range(50)])
  b = _write_parquet(tmp_path / "b", [{"body": f"B{i} " + "y" * (i % 7)} for i in range(40)])
  return _cfg(source="mixture", mixture=(
      {"source": "jsonl", "train_path": a, "eval_path": a, "weight": weights[0]},
      {"source": "parquet", "train_path": b, "text_field": "body", "weight": weights[1]}))


def test_mixture_follows_its_weights_and_is_deterministic(tmp_path):
  cfg = _mixture_cfg(tmp_path)
  tok = CharTokenizer()
  it = _iter(cfg, batch=4, seq_len=48)
  batches = [next(it) for _ in range(60)]
  texts = _texts(tok, batches)
  n, n_a = len(texts), sum(t.startswith("A") for t in texts)
  assert n > 300 and sum(t.startswith("B") for t in texts) == n - n_a
  # Within 3 binomial standard deviations of the 3:1 weights.
  assert abs(n_a - 0.75 * n) <= 3 * np.sqrt(n * 0.75 * 0.25), (n_a, n)
  # Both components really are shuffled and repeated (more draws than records).
  assert len({t for t in texts if t.startswith("A")}) == 50 and n_a > 50
  assert_batches_equal([next(_iter(cfg, batch=4, seq_len=48)) for _ in range(1)], batches[:1])
  again = _iter(cfg, batch=4, seq_len=48)
  assert_batches_equal([next(again) for _ in range(60)], batches)
  # The source itself (the tokenizer's training sample) draws in the same proportions.
  src = sources.make_source(cfg, "train")
  drawn = [sources.record_text(src[i])[0] for i in range(400)]
  assert drawn.count("A") == 300 and src.describe(1).startswith("data.mixture[")
  # Eval reads the components with an eval split, once.
  assert sources.has_eval_split(cfg)
  assert sorted(_texts(tok, list(_iter(cfg, "eval", batch=4, seq_len=48)))) == sorted(
      f"A{i} " + "x" * (i % 5) for i in range(50))


def test_mixture_resumes_exactly(tmp_path):
  cfg = _mixture_cfg(tmp_path, weights=(0.3, 0.7))
  it = _iter(cfg, batch=4, seq_len=40, process_index=1, process_count=2)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  after = [next(it) for _ in range(30)]  # Crosses epochs of both components.
  restored = _iter(cfg, batch=4, seq_len=40, process_index=1, process_count=2)
  restored.set_state(state)
  assert_batches_equal([next(restored) for _ in range(30)], after)


def test_mixture_config_errors_name_the_entry(tmp_path):
  base = config_lib.base_config()

  def check(mixture, pattern):
    c = config_lib.base_config()
    c.data.source = "mixture"
    c.data.mixture = mixture
    with pytest.raises(ValueError, match=pattern):
      config_lib.validate(c)

  check((), r"config.data.mixture=\(\): expected a non-empty list")
  path = _write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
  check(({"source": "jsonl", "train_path": path, "weight": 1.0},
         {"source": "synthetic_math", "weight": 0}), r"data.mixture\[1\].weight=0: expected")
  check(({"source": "jsonl", "train_path": path, "weight": 1, "path": "x"},),
        r"data.mixture\[0\] has unknown keys \['path'\]")
  check(({"source": "parquet", "weight": 1},), r"data.mixture\[0\].train_path is empty")
  check(({"source": "jsonl", "train_path": path, "prompt_field": "q", "weight": 1},),
        r"data.mixture\[0\].answer_field")
  c = config_lib.base_config()
  c.data.mixture = ({"source": "synthetic_math", "weight": 1},)
  with pytest.raises(ValueError, match=r"config.data.mixture=.*expected empty unless "
                                       r"data.source='mixture'"):
    config_lib.validate(c)
  base.data.source = "parquet"
  with pytest.raises(ValueError, match=r"config.data.train_path=''"):
    config_lib.validate(base)
  base.data.train_path = path
  config_lib.validate(base)
  # Source errors inside a component name it too.
  cfg = _cfg(source="mixture", mixture=({"source": "jsonl", "train_path": path, "weight": 1},
                                        {"source": "parquet", "train_path": path + ".nope",
                                         "weight": 1}))
  with pytest.raises(FileNotFoundError, match=r"data.mixture\[1\].train_path=.*no file matches"):
    sources.make_source(cfg, "train")
  assert not sources.has_eval_split(cfg)
  assert not sources.has_eval_split(_cfg(source="parquet", train_path=path))
  assert sources.has_eval_split(_cfg(source="parquet", train_path=path, eval_path=path))
  assert sources.has_eval_split(_cfg()) and sources.has_eval_split(_cfg(source="tfds"))


# --- errors name the file and the field ----------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_column_names_file_and_field(fmt, tmp_path):
  kind, path = _write_format(fmt, tmp_path, _rows(6))
  cfg = _cfg(source=kind, train_path=path, prompt_field="question", answer_field="solution",
             cache_dir=str(tmp_path / "cache"))
  with pytest.raises(ValueError, match=r"(\.parquet|\.arrow|\.array_record record 0|\.jsonl\.\w+:1)"
                                       r": missing (column|field) 'question' \(data.prompt_field\)"):
    sources.make_source(cfg, "train")
  if kind in ("parquet", "arrow"):  # Lists of messages are not plain text: say so.
    cfg = _cfg(source=kind, train_path=path, text_field="messages")
    with pytest.raises(ValueError, match=r"column 'messages' \(data.text_field\) has type list.*"
                                         r"chat/message lists are not supported"):
      sources.make_source(cfg, "train")


def test_corrupt_files_name_the_file(tmp_path):
  rows = _rows(40)
  good = tmp_path / "good"
  _write_parquet(good, rows, n_files=1)
  bad = tmp_path / "bad.parquet"
  bad.write_bytes((good / "train-00000-of-00001.parquet").read_bytes()[:-100])
  with pytest.raises(ValueError, match=rf"data.train_path: {bad}: not a readable parquet file"):
    sources.make_source(_cfg(source="parquet", train_path=str(bad), text_field="problem"), "train")

  hf = _write_hf_disk(tmp_path / "hf", rows, num_shards=1)
  arrow = f"{hf}/data-00000-of-00001.arrow"
  with open(arrow, "r+b") as f:
    f.truncate(os.path.getsize(arrow) // 2)
  with pytest.raises(ValueError, match=rf"data.train_path: {arrow}: not a readable Arrow IPC file"):
    sources.make_source(_cfg(source="arrow", train_path=hf, text_field="problem"), "train")

  ar = tmp_path / "x.array_record"
  ar.write_bytes(b"not an array_record file" * 10)
  with pytest.raises(ValueError, match=rf"data.train_path: {ar}: not a readable array_record"):
    sources.make_source(_cfg(source="array_record", train_path=str(ar), text_field="problem"),
                        "train")
  not_json = _write_array_record(tmp_path / "nj.array_record", [])
  from array_record.python.array_record_module import ArrayRecordWriter
  w = ArrayRecordWriter(not_json, "group_size:1")
  w.write(b"\xff\xfe")
  w.close()
  with pytest.raises(ValueError, match=rf"{not_json} record 0: not valid UTF-8"):
    sources.make_source(_cfg(source="array_record", train_path=not_json), "train")

  for name, data in [("t.jsonl.gz", gzip.compress(_jsonl_bytes(rows))),
                     ("t.jsonl.zst", zstandard.ZstdCompressor().compress(_jsonl_bytes(rows)))]:
    path = tmp_path / name
    path.write_bytes(data[:len(data) // 2])  # Truncated.
    with pytest.raises(ValueError, match=rf"data.train_path: {path}: cannot decompress after "
                                         r"line \d+ .*corrupt or truncated"):
      sources.make_source(_cfg(source="jsonl", train_path=str(path), text_field="problem"),
                          "train")
    assert not [f for f in os.listdir(tmp_path / ".vpt_cache") if ".tmp-" in f]
  bad_line = tmp_path / "l.jsonl.zst"
  bad_line.write_bytes(zstandard.ZstdCompressor().compress(
      _jsonl_bytes(rows[:2]) + b'{"problem": "x",}\n'))
  with pytest.raises(ValueError, match=rf"{bad_line}:3: invalid JSON"):
    sources.make_source(_cfg(source="jsonl", train_path=str(bad_line), text_field="problem"),
                        "train")
  # state.json may only name files inside its directory.
  (tmp_path / "hf" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../x"}]}))
  with pytest.raises(ValueError, match=r"data file name '../x' is not a file in"):
    sources.make_source(_cfg(source="arrow", train_path=hf, text_field="problem"), "train")


def test_sources_survive_pickling_for_worker_processes(tmp_path):
  import pickle
  rows = _rows(12)
  for fmt in FORMATS:
    (tmp_path / fmt).mkdir()
    kind, path = _write_format(fmt, tmp_path / fmt, rows)
    src = sources.make_source(_cfg(source=kind, train_path=path, text_field="problem",
                                   cache_dir=str(tmp_path / "cache")), "train")
    src[3]
    copy = pickle.loads(pickle.dumps(src))
    assert [copy[i] for i in range(12)] == [{"text": r["problem"]} for r in rows], fmt


# --- end to end -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_run_on_a_mixture_without_eval_split(tmp_path):
  """A real run (nano) on parquet mixed with jsonl.zst, neither with an eval split: it trains,
  skips the LM eval (before, a file source without data.eval_path only meant jsonl/text) and
  records the mixture in config.json."""
  from vpt.core import metrics
  from vpt.language import train
  from vpt.language.data import tokenizer as tok_lib
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = core_config.load_config_file(os.path.join(repo, "experiments", "lm_ntp.py"), "nano")
  # A tokenizer trained on the embedded synthetic math (the 64 rows are too few for one).
  tok_cfg = config_lib.data_config()
  tok_cfg.vocab_size, tok_cfg.tokenizer_train_examples = 400, 1000
  tok_lib.load_or_train_tokenizer(tok_cfg, str(tmp_path / "tok"))
  rows = _rows(64)
  config = core_config.with_overrides(config, {
      "progress_bar": False, "mesh.num_devices": 1, "num_steps": 2, "log_every_steps": 1,
      "eval_every_steps": 2, "eval_batches": 1, "data.source": "mixture",
      "data.vocab_size": 400, "data.tokenizer_path": str(tmp_path / "tok" / "tokenizer" / "spm.model"),
      "data.prompt_field": "problem", "data.answer_field": "solution",
      "data.mixture": ({"source": "parquet", "train_path": _write_parquet(tmp_path / "pq", rows),
                        "weight": 2.0},
                       {"source": "jsonl", "train_path": _write_zst(tmp_path / "z.jsonl.zst", rows),
                        "weight": 1.0})})
  summary = train.run(config, str(tmp_path / "run"))
  records = metrics.read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
  assert "loss" not in summary["eval"]  # No LM eval (feedback losses only).
  saved = json.load(open(tmp_path / "run" / "config.json"))["data"]["mixture"]
  assert [(e["source"], e["weight"]) for e in saved] == [("parquet", 2.0), ("jsonl", 1.0)]
