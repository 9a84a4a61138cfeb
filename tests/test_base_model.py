"""The cached base model (vpt/language/base_model.py): what enters it, what keys it, built once, reused, resumed."""

import os

import pytest

from vpt.core import config as core_config
from vpt.language import base_model, config_lib, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(tmp_path, **overrides):
  config = core_config.load_config_file(os.path.join(REPO, "experiments", "lm_vpt.py"), "nano,value")
  return core_config.with_overrides(config, {
      "progress_bar": False, "mesh.num_devices": 1, "base.num_steps": 3, "base.cache_dir": str(tmp_path / "cache"),
      "data.synthetic.downstream_format_fraction": 0.3, "data.synthetic.corrupt_fact_rate": 0.2,
      "data.synthetic.irrelevant_fraction": 0.3, "data.synthetic.seed": 202, **overrides})


def test_the_base_trains_ntp_on_the_clean_generator_with_its_own_filler_and_seed(tmp_path):
  config = _config(tmp_path)
  base = base_model.base_run_config(config)
  syn = base.data.synthetic
  assert base.vpt.mode == "ntp" and base.num_steps == 3 and not base.init_from and base.base.num_steps == 0
  assert syn.downstream_format_fraction == 1.0 and syn.corrupt_fact_rate == 0.0  # the clean generator
  assert syn.irrelevant_fraction == config.base.irrelevant_fraction and syn.seed == config.base.data_seed
  assert base.model.to_dict() == config.model.to_dict() and base.data.seq_len == config.data.seq_len
  assert base.optimizer.learning_rate == config.base.learning_rate


def test_the_cache_key_holds_what_sets_the_weights_and_nothing_of_the_continued_run(tmp_path):
  key = lambda **kw: base_model.cache_key(base_model.base_run_config(_config(tmp_path, **kw)))
  same = key()
  for continued in ({"vpt.mode": "ntp"}, {"num_steps": 7}, {"data.synthetic.seed": 5}, {"seed": 3},
                    {"optimizer.learning_rate": 1e-2}, {"data.synthetic.downstream_format_fraction": 1.0},
                    {"progress_bar": True}, {"feedback.batch_size": 4}, {"vpt.top_k": 4}, {"mesh.num_devices": 0}):
    assert key(**continued) == same, continued
  for base_setting in ({"base.num_steps": 4}, {"base.irrelevant_fraction": 0.1}, {"base.data_seed": 7},
                       {"base.learning_rate": 1e-2}, {"model.d_model": 64}, {"data.seq_len": 64}):
    assert key(**base_setting) != same, base_setting


@pytest.mark.slow
def test_with_base_builds_once_reuses_and_continues_from_it(tmp_path, monkeypatch):
  calls = []
  real_run = train.run
  monkeypatch.setattr(train, "run", lambda cfg, d: calls.append(d) or real_run(cfg, d))
  config = _config(tmp_path)
  continued = base_model.with_base(config, train.run)
  run_dir = base_model.base_dir(config)
  assert continued.init_from == run_dir and base_model.is_built(run_dir) and len(calls) == 1
  assert base_model.with_base(_config(tmp_path, **{"vpt.mode": "ntp"}), train.run).init_from == run_dir  # another arm
  assert len(calls) == 1  # reused, not retrained
  # An explicit init_from wins; no base steps: untouched.
  assert base_model.with_base(_config(tmp_path, init_from="/elsewhere"), train.run).init_from == "/elsewhere"
  assert base_model.with_base(_config(tmp_path, **{"base.num_steps": 0}), train.run).init_from == ""
  # The continued run starts from the base's weights and tokenizer.
  summary = train.run(core_config.with_overrides(continued, {"num_steps": 1}), str(tmp_path / "continued"))
  assert summary["step"] == 1 and os.path.isfile(tmp_path / "continued" / "tokenizer" / "spm.model")


@pytest.mark.slow
def test_an_interrupted_build_is_not_used_and_resumes_from_its_own_checkpoints(tmp_path, monkeypatch):
  config = _config(tmp_path)
  run_dir = base_model.base_dir(config)
  base = base_model.base_run_config(config)
  train.run(core_config.with_overrides(base, {"num_steps": 3, "checkpoint.every_steps": 2}), run_dir)
  os.remove(os.path.join(run_dir, "metrics.jsonl"))  # a build cut off after its checkpoints, before the marker
  assert not base_model.is_built(run_dir)
  starts = []
  real_run = train.run
  monkeypatch.setattr(train, "run", lambda cfg, d: starts.append(d) or real_run(cfg, d))
  assert base_model.with_base(config, train.run).init_from == run_dir and base_model.is_built(run_dir)
  assert starts == [run_dir]  # built in place: the checkpoints of the cut-off build were resumed


def test_a_base_needs_the_embedded_generator(tmp_path):
  config = _config(tmp_path, **{"data.source": "jsonl", "data.train_path": "/x.jsonl"})
  with pytest.raises(ValueError, match=r"config.base.num_steps=3: expected 0 unless data.source='synthetic_math'"):
    config_lib.validate(config)


def test_continuing_from_a_run_prints_no_orbax_metadata_warning(tmp_path, caplog):
  """Reading another run's params went through orbax with the item directory (…/<step>/state), and orbax
  warned on every start that the step's metadata file was missing there (it lives one level up)."""
  import jax
  from vpt.core import checkpoint as ckpt_lib
  run_dir = str(tmp_path / "base")
  summary = train.run(_config(tmp_path, **{"base.num_steps": 0, "vpt.mode": "ntp", "num_steps": 1}), run_dir)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), summary["state"].params)
  with caplog.at_level("WARNING"):
    params, step = ckpt_lib.load_learner_params(run_dir, abstract)
  assert step == 1 and jax.tree.structure(params) == jax.tree.structure(abstract)
  assert not [r for r in caplog.records if "Metadata file does not exist" in r.getMessage()]
