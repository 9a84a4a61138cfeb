"""Multitask feedback (the paper's v2) against explicit float64 references.

Several feedback sets: g_down == Σ_j ω_j ∇_S L_down(θ; batch of set j) computed by hand; a lone set of
weight 1 is today's step bit for bit. Domain-matched alignment: the value and designer gradient ==
−(1/|D|) Σ_d Align(ω_j(d) g_j(d), g_pre,d) by an explicit double backward through masked losses.
Isolation with two sets: the feedback labels reach θ only through φ. Resume between meta steps with two
sets == an uninterrupted run. Pipeline domain ids, disjoint sets, the dry run's feedback pytree, and
bad configs naming the field.
"""

import functools
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vpt import aot
from vpt.core import alignment, config as core_config, metrics, sharding
from vpt.core.optim import make_optimizer
from vpt.language import config_lib, train, vpt_step
from vpt.language.data import feedback as feedback_lib, pipeline, sources
from vpt.language.losses import downstream_nll
from vpt.language.models.designer import DesignerConfig, TaskDesigner
from vpt.language.models.lm import LMConfig, Transformer
from vpt.language.soft_targets import candidate_logprobs
from vpt.language.steps import init_train_state
from vpt.language.vpt_step import FeedbackPlan, init_designer_state, make_designer_optimizer, meta_objective

from conftest import CharTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, SEQ, LAYERS, K = 32, 8, 2, 4
TWO_SETS = FeedbackPlan(sets=(("a", 0.3), ("b", 1.7)))


def _batch(seed, b=4, domains=None):
  rng = np.random.default_rng(seed)
  toks = rng.integers(1, VOCAB, (b, SEQ + 1))
  mask = np.ones((b, SEQ))
  mask[:, :2] = 0  # a "prompt"
  out = {"inputs": toks[:, :-1].astype(np.int32), "targets": toks[:, 1:].astype(np.int32),
         "loss_mask": mask.astype(np.float32), "segment_ids": np.ones((b, SEQ), np.int32),
         "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (b, SEQ)).copy()}
  if domains is not None:  # a stream domain per token (packed rows change domain mid-row)
    out["domain_ids"] = rng.choice(domains, (b, SEQ)).astype(np.int32)
  return out


def _vpt_cfg(**kw):
  c = config_lib.vpt_config()
  c.mode, c.top_k = "value", K
  c.designer.d_model, c.designer.n_layers, c.designer.n_heads, c.designer.d_ff = 8, 1, 2, 16
  c.update(kw)
  return c


# ----------------------------------------------------------------------------- float64 math
# One learner block (S = that block, the final norm and the untied head; the embedding is the constant
# prefix) keeps the compiled programs small: compiling dominates these tests.


def _f64(batch):
  return {k: jnp.asarray(v, jnp.float64 if v.dtype == np.float32 else v.dtype) for k, v in batch.items()}


_MODEL64 = Transformer(LMConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                                tie_embeddings=False, dtype="float64"))
_DESIGNER64 = TaskDesigner(DesignerConfig(d_model=8, n_layers=1, n_heads=2, d_ff=16, dtype="float64"))


@functools.lru_cache(maxsize=1)
def _params64():
  """(learner params θ, designer params φ), float64: the initialisers' shapes with seeded random values
  (norm scales near 1), so that nothing is compiled for them."""
  rng = np.random.default_rng(0)

  def fill(tree, scale):
    flat = traverse_util.flatten_dict(tree, sep="/")
    return traverse_util.unflatten_dict({k: jnp.asarray((1.0 if k.endswith("scale") else 0.0) + scale * rng.standard_normal(
        v.shape), jnp.float64) for k, v in flat.items()}, sep="/")

  tokens = jnp.zeros((1, SEQ), jnp.int32)
  params = fill(jax.eval_shape(_MODEL64.init, jax.random.PRNGKey(0), tokens)["params"], 0.3)
  cands = jnp.zeros((1, SEQ, K), jnp.int32)
  dshape = jax.eval_shape(_DESIGNER64.init, jax.random.PRNGKey(0), params["embed_tokens"]["embedding"], tokens,
                          tokens, tokens, tokens + 1, cands, jnp.zeros(cands.shape, jnp.float64))["params"]
  return params, fill(dshape, 0.3)


def _fb_batches():
  fb_b = _batch(3, b=5)
  fb_b["loss_mask"][2] = 0  # a row without answer tokens: L_down's example mean must skip it
  return {"a": _f64(_batch(2)), "b": _f64(fb_b)}


def _explicit_down_grads(params, fb):
  """{name: ω_j ∇_S L_down on set j's whole batch}, through the full model (no prefix, no halves)."""
  subset, rest = alignment.split_params(params, 1, 1)

  def grad(b):
    logits = lambda s: _MODEL64.apply({"params": alignment.merge_params(s, rest)}, b["inputs"], b["positions"],
                                      b["segment_ids"])
    return jax.grad(lambda s: downstream_nll(logits(s), b["targets"], b["loss_mask"]))(subset)

  return {name: {k: w * v for k, v in grad(fb[name]).items()} for name, w in TWO_SETS.sets}


def _explicit_gpre(info, q, mask):
  """∇_S of the soft-target loss on the tokens of `mask` (their mean), differentiable in q."""
  n = jnp.maximum(jnp.sum(mask), 1.0)
  loss = lambda s: -jnp.sum(mask[..., None] * q * candidate_logprobs(info["aligned"].logits(s), info["cand_ids"])) / n
  return jax.grad(loss)(info["subset"])


def _objective_and_reference(vpt_cfg, plan, batch, reference):
  """Under one jit: (loss, value, ∇φ loss) of meta_objective and of `reference(dparams, info, g)` (g: the
  explicit ω_j g_j), info's g_down and set_grads, and g."""
  params, dparams = _params64()
  opt_cfg = config_lib.base_config().optimizer
  opt_state = make_optimizer(opt_cfg, 10)[0].init(params)

  # Compiled at XLA:CPU's lowest backend optimisation (the same float64 results to ~1e-16, half the compile).
  @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
  def both(dparams, params, fb, batch):
    objective, info = meta_objective(params, opt_state, dparams, batch, fb, jax.random.PRNGKey(3), model=_MODEL64,
                                     designer=_DESIGNER64, vpt_cfg=vpt_cfg, learner_opt_cfg=opt_cfg, plan=plan)
    (loss, aux), grad = jax.value_and_grad(objective, has_aux=True)(dparams)
    g = _explicit_down_grads(params, fb)
    (ref_loss, ref_value), ref_grad = jax.value_and_grad(lambda d: reference(d, info, g), has_aux=True)(dparams)
    return (loss, aux["value"], grad), (ref_loss, ref_value, ref_grad), info["g_down"], info["set_grads"], g

  return both(dparams, params, _fb_batches(), batch)


def _assert_trees_close(got, want, rtol, atol=0.0):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def test_g_down_of_two_sets_is_the_weighted_sum_of_their_gradients(x64):
  batch = _f64(_batch(1))

  def pooled_reference(d, info, g):
    """−⟨ω_a g_a + ω_b g_b, g_pre(q)⟩, explicit."""
    g_down = {k: g["a"][k] + g["b"][k] for k in g["a"]}
    v = alignment.tree_vdot(g_down, _explicit_gpre(info, info["targets_of"](d)[2], batch["loss_mask"]))
    return -v, v

  ours, ref, g_down, set_grads, g = _objective_and_reference(_vpt_cfg(align_last_n_layers=1), TWO_SETS, batch,
                                                             pooled_reference)
  _assert_trees_close(g_down, {k: g["a"][k] + g["b"][k] for k in g["a"]}, rtol=1e-10, atol=1e-14)
  _assert_trees_close(set_grads, g, rtol=1e-10, atol=1e-14)  # ω_j g_j per set
  norm = lambda t: float(alignment.tree_norm(t))
  assert norm(g["a"]) > 1e-3 and abs(float(alignment.tree_vdot(g["a"], g["b"]))) < 0.99 * norm(g["a"]) * norm(g["b"])
  assert abs(float(ref[1])) > 1e-8
  np.testing.assert_allclose(float(ours[1]), float(ref[1]), rtol=1e-8)  # value
  _assert_trees_close(ours[2], ref[2], rtol=1e-7, atol=1e-13)  # designer gradient vs double backward


@pytest.mark.parametrize("align", ["dot", pytest.param("cosine", marks=pytest.mark.slow)])
def test_domain_matched_value_and_gradient_match_the_explicit_double_backward(x64, align):
  # Domains 0 and 3 pair with set a, 1 with b, 2 is filler (no set), 4 pairs with b but is absent from the
  # batch (it adds 0 and counts in |D|).
  domains = ((0, "a"), (1, "b"), (3, "a"), (4, "b"))
  plan = FeedbackPlan(sets=TWO_SETS.sets, domains=domains)
  batch = _f64(_batch(1, domains=[0, 1, 2, 3]))
  masks = jnp.stack([batch["loss_mask"] * (batch["domain_ids"] == d) for d, _ in domains])
  assert all(float(jnp.sum(m)) > 0 for m in masks[:3]) and float(jnp.sum(masks[3])) == 0
  assert float(jnp.sum(batch["loss_mask"] * (batch["domain_ids"] == 2))) > 0  # filler tokens, left out

  def matched_reference(d, info, g):
    """−(1/|D|) Σ_d Align(ω g_j(d), g_pre,d(q)), g_pre,d by an explicit backward of the domain-masked loss
    (vmapped over the domains: one double backward in the compiled program)."""
    q = info["targets_of"](d)[2]
    g_of_domain = jax.tree.map(lambda *x: jnp.stack(x), *[g[name] for _, name in domains])

    def term(mask, g_dom):
      g_pre = _explicit_gpre(info, q, mask)
      v = alignment.tree_vdot(g_dom, g_pre)
      if align == "dot":
        return v, v
      # An absent domain has g_pre = 0: its cosine is 0 (the code's guard), with a gradient-safe norm.
      norm = jnp.sqrt(jnp.maximum(alignment.tree_vdot(g_pre, g_pre), 1e-60))
      return v / (alignment.tree_norm(g_dom) * norm), v

    aligns, values = jax.vmap(term)(masks, g_of_domain)
    return -jnp.mean(aligns), jnp.mean(values)

  vpt_cfg = _vpt_cfg(align=align, alignment="domain_matched", align_last_n_layers=1)
  ours, ref, *_ = _objective_and_reference(vpt_cfg, plan, batch, matched_reference)
  assert abs(float(ref[1])) > 1e-8
  np.testing.assert_allclose(float(ours[1]), float(ref[1]), rtol=1e-8)  # value
  np.testing.assert_allclose(float(ours[0]), float(ref[0]), rtol=1e-8)  # designer loss
  _assert_trees_close(ours[2], ref[2], rtol=1e-7, atol=1e-13)  # designer gradient vs double backward


# ----------------------------------------------------------------------------- the jitted step (float32)


def _step_setup(plan, designer_lr=1e-2, alignment="pooled", abstract=False):
  """(initial state, jitted V-Pretraining step) of a one-block learner; abstract: the state's shapes only."""
  vcfg = _vpt_cfg(meta_every=2, alignment=alignment, align_last_n_layers=1)
  vcfg.designer.learning_rate = designer_lr
  model = Transformer(LMConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32))
  opt_cfg = config_lib.base_config().optimizer
  optimizer, schedule = make_optimizer(opt_cfg, 20)

  def init():
    state = init_train_state(model, optimizer, SEQ, seed=0)
    designer = TaskDesigner(DesignerConfig.from_config(vcfg))
    return state.replace(designer=init_designer_state(designer, make_designer_optimizer(vcfg), state.params, SEQ,
                                                      K, seed=0))

  state = jax.eval_shape(init) if abstract else jax.jit(init)()
  return state, jax.jit(vpt_step.make_vpt_train_step(model, optimizer, schedule, vcfg, opt_cfg, plan=plan))


def _same(x, y):
  return all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True))


def test_one_set_of_weight_one_traces_todays_step():
  """The default config takes the plain path (one batch, no plan); a plan of one set of weight 1 traces the
  very same program (jaxpr), so it reproduces today's step bit for bit (run: the slow test below)."""
  assert vpt_step.feedback_plan(config_lib.base_config()) == FeedbackPlan()
  jaxprs = []
  for plan in (None, FeedbackPlan(sets=(("main", 1.0),))):
    state, step = _step_setup(plan, abstract=True)
    fb = _batch(100)
    jaxprs.append(str(jax.make_jaxpr(step)(state, _batch(0), fb if plan is None else {"main": fb})))
  assert "cond" in jaxprs[0] and jaxprs[0] == jaxprs[1]


@pytest.mark.slow
def test_one_set_of_weight_one_is_todays_step_bit_for_bit():
  results = []
  for plan in (None, FeedbackPlan(sets=(("main", 1.0),))):
    state, step = _step_setup(plan)
    for i in range(3):  # steps 0 and 2 are meta steps
      fb = _batch(100 + i)
      state, m = step(state, _batch(i), fb if plan is None else {"main": fb})
    results.append((jax.device_get(state), jax.device_get(m)))
  (plain, m_plain), (one, m_one) = results
  assert _same(plain, one) and _same(m_plain, m_one)
  assert float(m_plain["meta/value"]) != 0.0


@pytest.mark.slow
def test_feedback_labels_of_two_sets_reach_the_learner_only_through_the_designer():
  """Domain-matched, two sets: with φ frozen the learner's update is bit-identical whatever the answers of
  either set are (though the designer's objective reads them), and d(learner params)/d(both sets' loss
  masks) is exactly zero."""
  plan = FeedbackPlan(sets=TWO_SETS.sets, domains=((0, "a"), (1, "b")))
  state, step = _step_setup(plan, designer_lr=0.0, alignment="domain_matched")
  for i in range(2):
    state, _ = step(state, _batch(50 + i, domains=[0, 1, 2]), {"a": _batch(150 + i), "b": _batch(250 + i)})
  assert int(state.step) == 2  # a meta step, past the learning rate's 0
  batch, fb = _batch(0, domains=[0, 1, 2]), {"a": _batch(100), "b": _batch(200)}
  other = jax.tree.map(np.copy, fb)
  for name in other:
    other[name]["targets"] = (other[name]["targets"] * 7 + 3) % VOCAB  # different answers in both sets
  s1, m1 = step(state, batch, fb)
  s2, m2 = step(state, batch, other)
  assert float(m1["meta/value"]) != float(m2["meta/value"])  # the feedback really was read...
  assert float(m1["learning_rate"]) > 0 and float(m1["alpha_mean"]) > 0
  assert _same(s1.params, s2.params)  # ...yet the learner's update is bit-identical.

  def params_after(masks):
    return step(state, batch, {n: {**fb[n], "loss_mask": masks[n]} for n in fb})[0].params

  masks = {n: jnp.asarray(fb[n]["loss_mask"]) for n in fb}
  _, vjp = jax.vjp(params_after, masks)
  (cotangent,) = vjp(jax.tree.map(jnp.ones_like, state.params))
  for n in fb:
    np.testing.assert_array_equal(np.asarray(cotangent[n]), 0.0)


# ----------------------------------------------------------------------------- data, plan, dry run


def test_pipeline_domain_ids_mark_filler_math_and_mixture_components(tmp_path):
  tok = CharTokenizer()
  cfg = config_lib.data_config()
  cfg.synthetic.irrelevant_fraction = 0.5
  cfg.truncate_long_examples = True
  batch = next(pipeline.make_lm_iterator(cfg, tok, split="train", global_batch_size=4, seq_len=256, seed=0))
  dom, seg, mask = batch["domain_ids"], batch["segment_ids"], batch["loss_mask"]
  assert dom.dtype == np.int32 and dom.shape == batch["targets"].shape
  np.testing.assert_array_equal(dom[seg == 0], -1)  # padding
  kinds = set()
  for r in range(dom.shape[0]):
    for s in range(1, seg[r].max() + 1):
      d = set(dom[r][seg[r] == s])
      assert len(d) == 1  # one domain per example
      # Filler is plain text (a loss on every token); a math record has an unmasked prompt.
      kinds.add((d.pop(), bool(mask[r][seg[r] == s].all())))
  assert kinds == {(sources.DOMAIN_MATH, False), (sources.DOMAIN_FILLER, True)}

  (tmp_path / "prose.txt").write_text("".join(f"zz prose line {i}\n" for i in range(50)))
  mix = config_lib.data_config()
  mix.source, mix.truncate_long_examples = "mixture", True
  mix.mixture = ({"weight": 1.0, "source": "synthetic_math"},
                 {"weight": 1.0, "source": "text", "train_path": str(tmp_path / "prose.txt")})
  batch = next(pipeline.make_lm_iterator(mix, tok, split="train", global_batch_size=4, seq_len=256, seed=0))
  seen = set()
  for r in range(4):
    for s in range(1, batch["segment_ids"][r].max() + 1):
      m = batch["segment_ids"][r] == s
      d = set(batch["domain_ids"][r][m])
      text = tok.decode(batch["inputs"][r][m][1:])
      assert d == {1 if text.startswith("zz prose") else 0}, text
      seen |= d
  assert seen == {0, 1}
  # Eval reads the components with an eval split: their domains keep their data.mixture index.
  mix.mixture = ({"weight": 1.0, "source": "text", "train_path": str(tmp_path / "prose.txt")},
                 {"weight": 1.0, "source": "synthetic_math"})
  batch = next(pipeline.make_lm_iterator(mix, tok, split="eval", global_batch_size=4, seq_len=256, seed=0))
  assert set(np.unique(batch["domain_ids"][batch["segment_ids"] > 0])) == {1}


def test_feedback_sets_are_disjoint_and_the_first_is_the_lone_set(tmp_path):
  fb = config_lib.feedback_config()
  fb.num_examples = 300
  fb.sets = [{"name": "b"}, {"name": "c", "seed": 0}, {"name": "d", "seed": 0, "num_examples": 50}]
  fb_sets = config_lib.feedback_sets(fb)
  assert [(s.name, s.config.seed, s.weight) for s in fb_sets] == [("main", 0, 1.0), ("b", 1, 1.0), ("c", 0, 1.0),
                                                                  ("d", 0, 1.0)]
  records = feedback_lib.feedback_set_records(fb_sets)
  assert records["main"] == feedback_lib.make_feedback_records(fb)  # the lone set's records, unchanged
  assert [len(records[n]) for n in ("main", "b", "c", "d")] == [300, 300, 300, 50]
  questions = [{r["question"] for r in records[n]} for n in ("main", "b", "c", "d")]
  for i, x in enumerate(questions):
    for y in questions[i + 1:]:
      assert not x & y  # distinct seeds or the same one as main (c, d): no problem in two sets
  # One GSM8K-format file for two sets: disjoint records of it; the later set gets what is left.
  path = tmp_path / "gsm.jsonl"
  path.write_text("".join(f'{{"question": "q{i}?", "answer": "{i} + 1 = {i + 1}\\n#### {i + 1}"}}\n'
                          for i in range(10)))
  gsm = config_lib.feedback_config()
  gsm.source, gsm.path, gsm.num_examples = "gsm8k_jsonl", str(path), 6
  gsm.sets = {"b": {"weight": 2.0}}
  records = feedback_lib.feedback_set_records(config_lib.feedback_sets(gsm))
  first, second = ({r["question"] for r in records[n]} for n in ("main", "b"))
  assert len(first) == 6 and len(second) == 4 and not first & second


def test_dry_run_feedback_pytree_is_the_one_training_feeds():
  config = core_config.load_config_file(os.path.join(REPO, "experiments", "lm_vpt.py"), "nano,value")
  config = core_config.with_overrides(config, {"feedback.sets": ({"name": "b", "weight": 0.5, "batch_size": 4,
                                                                 "seq_len": 64},)})
  config_lib.validate(config)
  plan = vpt_step.feedback_plan(config)
  assert plan == FeedbackPlan(sets=(("main", 1.0), ("b", 0.5)))
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  names = {train.feedback_iterator_name(s) for s in config_lib.feedback_sets(config.feedback)}
  assert names == {"feedback", "feedback_b"}  # the lone set's checkpoint item keeps its name
  fed = train._FeedbackFeed(dict.fromkeys(names), config, plan, mesh)._zeros()
  abstract = aot.abstract_feedback(config, mesh)
  assert jax.tree.structure(fed) == jax.tree.structure(abstract)
  for x, y in zip(jax.tree.leaves(fed), jax.tree.leaves(abstract)):
    assert (x.shape, x.dtype) == (y.shape, y.dtype)
  assert abstract["b"]["inputs"].shape == (4, 64) and abstract["main"]["inputs"].shape == (8, 128)
  # Without sets: today's one plain batch.
  lone = core_config.load_config_file(os.path.join(REPO, "experiments", "lm_vpt.py"), "nano,value")
  assert set(aot.abstract_feedback(lone, mesh)) == set(train.FEEDBACK_FIELDS)
  # Domain-matched on the synthetic stream: math pairs with the main set, filler with none, and a set no
  # domain pairs with is not read.
  dm = core_config.with_overrides(config, {"vpt.alignment": "domain_matched"})
  assert vpt_step.feedback_plan(dm) == FeedbackPlan(sets=(("main", 1.0),), domains=((sources.DOMAIN_MATH, "main"),))


def _base(**overrides):
  config = core_config.load_config_file(os.path.join(REPO, "experiments", "lm_vpt.py"), "nano,value")
  return core_config.with_overrides(config, overrides)


@pytest.mark.parametrize("overrides,field", [
    ({"feedback.weight": 0.0}, "config.feedback.weight=0.0"),
    ({"feedback.sets": ({"name": "b", "weight": -1.0},)}, r"config.feedback.sets\[0\].weight=-1.0"),
    ({"feedback.sets": {"b": {"weight": 0}}}, "config.feedback.sets.b.weight=0"),
    ({"feedback.sets": ({"name": "b"}, {"name": "b"})}, r"config.feedback.sets\[1\].name='b'"),
    ({"feedback.sets": ({"name": "main"},)}, r"config.feedback.sets\[0\].name='main'"),
    ({"feedback.sets": ({"weight": 2.0},)}, r"config.feedback.sets\[0\] has no 'name'"),
    ({"feedback.sets": ({"name": "b", "wieght": 2.0},)}, r"config.feedback.sets\[0\] has unknown keys \['wieght'\]"),
    ({"feedback.sets": ({"name": "b c"},)}, r"config.feedback.sets\[0\].name='b c'"),
    ({"feedback.sets": ({"name": "b", "seq_len": 4},)}, r"config.feedback.sets\[0\].seq_len=4"),
    ({"feedback.sets": ({"name": "b", "seed": "x"},)}, r"config.feedback.sets\[0\].seed='x'"),
    ({"vpt.alignment": "matched"}, "config.vpt.alignment='matched'"),
    ({"data.source": "mixture", "data.mixture": ({"weight": 1.0, "source": "synthetic_math"},
                                                 {"weight": 1.0, "source": "synthetic_math", "feedback_set": "nope"})},
     r"config.data.mixture\[1\].feedback_set='nope'"),
    ({"data.source": "mixture", "vpt.alignment": "domain_matched",
      "data.mixture": ({"weight": 1.0, "source": "synthetic_math"},)}, "config.vpt.alignment='domain_matched'"),
])
def test_bad_multitask_config_names_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    config_lib.validate(_base(**overrides))


# ----------------------------------------------------------------------------- resume (slow)


def _two_set_config(alignment, **overrides):
  # Two stream domains (mixture components) paired with two feedback sets.
  return _base(**{"progress_bar": False, "mesh.num_devices": 1, "num_steps": 10, "log_every_steps": 1,
                  "checkpoint.every_steps": 1000, "eval_every_steps": 1000, "eval_batches": 1, "vpt.meta_every": 4,
                  "vpt.alignment": alignment, "data.source": "mixture",
                  "data.mixture": ({"weight": 1.0, "source": "synthetic_math", "feedback_set": "main"},
                                   {"weight": 1.0, "source": "synthetic_math", "feedback_set": "b"}),
                  "feedback.sets": ({"name": "b", "weight": 0.5, "batch_size": 4},), **overrides})


@pytest.mark.slow
@pytest.mark.parametrize("alignment", ["pooled", "domain_matched"])
def test_two_sets_resume_between_meta_steps_equals_uninterrupted(tmp_path, monkeypatch, alignment):
  config = _two_set_config(alignment)
  write_scalars = metrics.MetricWriter.write_scalars

  def write_then_preempt(self, step, scalars, prefix=""):
    write_scalars(self, step, scalars, prefix=prefix)
    if step == 6 and prefix == "train":  # meta steps are 0, 4, 8: stop between two of them
      os.kill(os.getpid(), signal.SIGTERM)

  with monkeypatch.context() as m:
    m.setattr(metrics.MetricWriter, "write_scalars", write_then_preempt)
    half = train.run(config, str(tmp_path / "resumed"))
  assert half["preempted"] and half["step"] == 6
  saved = sorted(os.listdir(tmp_path / "resumed" / "checkpoints" / "6"))
  assert {"feedback", "feedback_b", "data", "state"} <= set(saved)
  resumed = train.run(config, str(tmp_path / "resumed"))
  assert resumed["start_step"] == 6 and resumed["step"] == 10
  straight = train.run(config, str(tmp_path / "straight"))
  assert _same(jax.device_get((resumed["state"].params, resumed["state"].designer)),
               jax.device_get((straight["state"].params, straight["state"].designer)))
  assert np.isfinite(straight["train"]["meta/value"]) and straight["train"]["meta/value"] != 0.0
