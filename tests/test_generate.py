"""KV-cached generation against the full-prefix recompute through Transformer.apply."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpt.language import generate as gen
from vpt.language.models.lm import LMConfig, Transformer

from conftest import CharTokenizer


CONFIGS = {  # tied/untied, GQA (2 kv heads for 4), MHA, MQA, qkv bias on/off.
    "tied_gqa_bias": dict(tie_embeddings=True, qkv_bias=True, n_kv_heads=2),
    "untied_mha_nobias": dict(tie_embeddings=False, qkv_bias=False, n_kv_heads=4),
    "tied_mqa_nobias": dict(tie_embeddings=True, qkv_bias=False, n_kv_heads=1),
    "untied_gqa_bias_headdim": dict(tie_embeddings=False, qkv_bias=True, n_kv_heads=2, head_dim=16),
}
EOS, PAD = 2, 0


def random_params(model, seed=0, std=0.1):
  """Random params of the model's shapes, drawn in NumPy (eager Flax init compiles many kernels)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  rng = np.random.default_rng(seed)
  def draw(path, s):
    x = rng.normal(0.0, std, s.shape)
    return (1.0 + x if jax.tree_util.keystr(path).endswith("['scale']") else x).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def tiny(vocab=103, **kw):
  cfg = LMConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, d_ff=64, **{"n_kv_heads": 2, **kw})
  model = Transformer(cfg)
  return model, random_params(model)


def prompts(vocab=103, lengths=(5, 13, 1, 9), seed=0):
  rng = np.random.default_rng(seed)
  return [[1] + rng.integers(3, vocab, size=n - 1).tolist() for n in lengths]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_greedy_equals_uncached(name):
  model, params = tiny(**CONFIGS[name])
  ps = prompts()
  kw = dict(max_new_tokens=32, eos_id=EOS, pad_id=PAD)
  cached = gen.generate_tokens(model, params, ps, **kw)
  # The growing recompute window (3 compiled shapes) once; the whole buffer (1 shape) otherwise.
  window = 16 if name == "tied_gqa_bias" else None
  uncached = gen.generate_tokens_uncached(model, params, ps, window_bucket=window, **kw)
  assert cached.shape == (4, 32)
  np.testing.assert_array_equal(cached, uncached)


def test_batched_rows_equal_each_prompt_alone():
  """Left padding must not shift RoPE positions: a row decodes as if it were alone."""
  model, params = tiny(**CONFIGS["tied_gqa_bias"])
  ps = prompts()
  kw = dict(max_new_tokens=32, eos_id=EOS, pad_id=PAD)
  batched = gen.generate_tokens(model, params, ps, **kw)
  for i, p in enumerate(ps):
    alone = gen.generate_tokens_uncached(model, params, [p], window_bucket=None, **kw)
    np.testing.assert_array_equal(batched[i], alone[0])


def test_prefill_logits_match_model():
  model, params = tiny(**CONFIGS["untied_gqa_bias_headdim"])
  toks = jnp.asarray(prompts(lengths=(9, 9))).astype(jnp.int32)
  ref = jax.jit(model.apply)({"params": params}, toks)[:, -1]
  pos = jnp.broadcast_to(jnp.arange(9), toks.shape)
  mask = jnp.tril(jnp.ones((9, 9), bool))[None, None]
  forward = jax.jit(gen._forward, static_argnums=0)
  got, _ = forward(model.cfg, params, toks, pos, mask, None, 0)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_chunking_and_eos_do_not_change_tokens():
  model, params = tiny()
  ps = prompts()
  kw = dict(max_new_tokens=32, pad_id=PAD)
  ref = gen.generate_tokens(model, params, ps, eos_id=EOS, **kw)
  for chunk in (1, 5):
    np.testing.assert_array_equal(gen.generate_tokens(model, params, ps, eos_id=EOS, chunk_size=chunk,
                                                      **kw), ref)
  # Declare a token row 0 generates at step 3 to be eos: that row stops there, others continue.
  eos = int(ref[0, 3])
  out = gen.generate_tokens(model, params, ps, eos_id=eos, **kw)
  first = int(np.argmax(ref[0] == eos))
  np.testing.assert_array_equal(out[0, :first + 1], ref[0, :first + 1])
  assert (out[0, first + 1:] == PAD).all()
  for i in range(1, 4):
    stop = np.flatnonzero(ref[i] == eos)
    end = stop[0] + 1 if stop.size else 32
    np.testing.assert_array_equal(out[i, :end], ref[i, :end])


def test_sampling_deterministic_and_matches_uncached():
  model, params = tiny(**CONFIGS["tied_gqa_bias"])
  ps = prompts()
  kw = dict(max_new_tokens=32, eos_id=EOS, pad_id=PAD, temperature=0.9, top_p=0.9)
  a = gen.generate_tokens(model, params, ps, rng=jax.random.PRNGKey(7), **kw)
  b = gen.generate_tokens(model, params, ps, rng=jax.random.PRNGKey(7), chunk_size=4, **kw)
  c = gen.generate_tokens(model, params, ps, rng=jax.random.PRNGKey(8), **kw)
  u = gen.generate_tokens_uncached(model, params, ps, rng=jax.random.PRNGKey(7), window_bucket=None, **kw)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, u)
  assert (a != c).any()
  greedy = gen.generate_tokens(model, params, ps, max_new_tokens=32, eos_id=EOS, pad_id=PAD)
  assert (a != greedy).any()


def test_low_temperature_and_tiny_top_p_equal_greedy():
  # Same model and static settings as the sampling test above: the compiled programs are reused.
  model, params = tiny(**CONFIGS["tied_gqa_bias"])
  ps = prompts()
  kw = dict(max_new_tokens=32, eos_id=EOS, pad_id=PAD, rng=jax.random.PRNGKey(3))
  greedy = gen.generate_tokens(model, params, ps, **kw)
  np.testing.assert_array_equal(gen.generate_tokens(model, params, ps, temperature=1e-5, top_p=0.99,
                                                    **kw), greedy)
  np.testing.assert_array_equal(gen.generate_tokens(model, params, ps, temperature=1.0, top_p=1e-6,
                                                    **kw), greedy)


def test_nucleus_keeps_only_the_top_mass():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  draw = lambda top_p: np.asarray(gen.sample_logits(logits, jax.random.PRNGKey(0), 1.0, top_p,
                                                    greedy=False, nucleus=top_p < 1))
  assert set(draw(0.7).tolist()) == {0, 1}  # 0.5 < 0.7 needs the second token, not the third.
  assert set(draw(0.5).tolist()) == {0}
  assert set(draw(1.0).tolist()) == {0, 1, 2, 3}
  np.testing.assert_allclose(np.bincount(draw(0.7), minlength=4)[:2] / 2000, [0.625, 0.375], atol=0.04)


def test_truncate_at_stop():
  assert gen.truncate_at_stop("a\nb\n\nQuestion: c", ("\n\n", "Question:")) == "a\nb"
  assert gen.truncate_at_stop("x Question: y\n\nz", ("\n\n", "Question:")) == "x "
  assert gen.truncate_at_stop("plain", ("\n\n",)) == "plain"
  assert gen.truncate_at_stop("plain", ()) == "plain"


def test_text_generate_stops_and_matches_uncached():
  tok = CharTokenizer()
  model, params = tiny(vocab=tok.vocab_size)  # == CONFIGS["tied_gqa_bias"] at vocab 103.
  assert tok.vocab_size == 103
  # Four prompts of at most 12 characters in one batch: the [4, 13] shapes of the tests above,
  # so their compiled programs are reused (prompt_bucket=1: no rounding up).
  texts = ["Q: 1+1?\nA:", "Hi", "Question: ab", "x"]
  kw = dict(max_new_tokens=32, batch_size=4, prompt_bucket=1)
  free = gen.generate(model, params, tok, texts, stop=(), **kw)
  assert free == gen.generate_uncached(model, params, tok, texts, stop=(), **kw)
  assert all(0 < len(t) <= 32 for t in free)
  # Stop strings cut each output at their first occurrence (chunked decoding stops early).
  stop = free[0][5:7]
  cut = gen.generate(model, params, tok, texts, stop=(stop,), chunk_size=4, **kw)
  for full, short in zip(free, cut):
    assert short == gen.truncate_at_stop(full, (stop,))
  assert cut[0] == free[0][:free[0].find(stop)]
  # Sampling from text is reproducible for a fixed rng.
  kw.update(temperature=0.9, top_p=0.9, stop=(), rng=jax.random.PRNGKey(1))
  assert gen.generate(model, params, tok, texts, **kw) == gen.generate(model, params, tok, texts, **kw)


def test_generation_under_an_8_device_mesh_equals_one_device():
  """Rows split over data × fsdp = 4, params over fsdp and tensor (heads, MLP, vocabulary): the same
  tokens as on one device (std 0.5: peaked logits, no near-ties for the reduction order to flip),
  with stop strings ending rows between chunks and a last batch filled with inactive rows."""
  from vpt.language import config_lib
  from vpt.core import sharding
  tok = CharTokenizer()
  model, _ = tiny(vocab=tok.vocab_size, **CONFIGS["untied_gqa_bias_headdim"])
  params = random_params(model, std=0.5)
  mesh_cfg = config_lib.base_config().mesh
  mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = 2, 2, 2
  mesh = sharding.make_mesh(mesh_cfg)
  sharded = gen.shard_params(params, mesh)
  q = sharded["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape == (16, 32)
  texts = ["Question: 1 + 2 =", "ab", "The", "x y z", "0"]  # batches of 4, then 1 filled up to 4
  kw = dict(max_new_tokens=24, batch_size=3, stop=("e",), chunk_size=4, prompt_bucket=32)
  one = gen.generate(model, params, tok, texts, **kw)
  eight = gen.generate(model, sharded, tok, texts, mesh=mesh, **kw)
  assert eight == one and len(set("".join(one))) > 10
  with pytest.raises(ValueError, match=r"3 prompts cannot be split .*data × fsdp = 4"):
    gen.generate_tokens(model, sharded, [[1, 5]] * 3, max_new_tokens=4, eos_id=EOS, pad_id=PAD, mesh=mesh)
