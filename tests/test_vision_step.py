"""The vision V-Pretraining step: the value and the designer gradient in float64 against explicit
references (vmapped JVP == per-candidate backward dots; reverse-over-JVP == double backward ==
finite differences), mode "dino" == a plain DINO step built by hand, feedback isolation, and
sharded == single device."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vpt.core import alignment, sharding
from vpt.vision import candidates as cand_lib, config as vision_config_lib, dino, step as vs, views as vv
from vpt.vision.models.unet import total_variation
from vpt.vision.models.vit import ViTConfig

# Unoptimised LLVM code generation: these programs are tiny, and XLA:CPU's optimising backend would
# spend most of the test time compiling them. Every compared pair is compiled the same way.
FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
fast_jit = functools.partial(jax.jit, compiler_options=FAST)
B, SIZE, NUM_CLASSES, NUM_STEPS = 8, 16, 5, 10


def vision_config(mode="unet", **overrides) -> ml_collections.ConfigDict:
  """The contract's config layout (docs: /work/briefs/vision_interface.md), tiny; the fields it leaves out
  read the schema's defaults (vision_config.with_defaults), as a run's config does."""
  c = ml_collections.ConfigDict()
  c.task, c.seed, c.num_steps, c.batch_size = "vision", 0, NUM_STEPS, B
  c.model = ml_collections.ConfigDict(dict(image_size=SIZE, patch_size=4, d_model=16, n_layers=2, n_heads=2))
  c.dino = ml_collections.ConfigDict(dict(
      head_hidden=16, head_bottleneck=8, out_dim=32, t_s=0.1, t_t=0.04, center_momentum=0.9, momentum_base=0.996,
      n_local_crops=1, global_size=SIZE, local_size=8, blur_sigma=(0.1, 1.0)))
  c.optimizer = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=0, weight_decay=0.04, b1=0.9,
                                               b2=0.999, grad_clip_norm=1.0, end_lr_fraction=0.0))
  c.data = ml_collections.ConfigDict(dict(source="scenes"))
  c.feedback = ml_collections.ConfigDict(dict(alpha_seg=1.0, alpha_dep=2.0, batch_size=B, head_learning_rate=1e-2,
                                              head_steps=1, num_classes=NUM_CLASSES))
  c.vpt = ml_collections.ConfigDict(dict(mode=mode, meta_every=2, burn_in_steps=0, align_last_n_layers=1,
                                         meta_batch_size=B, align="dot"))
  c.vpt.designer = ml_collections.ConfigDict(dict(base_channels=4, depth=2, learning_rate=1e-3, keep_ratio=0.6,
                                                  lambda_sparsity=0.3, lambda_tv=0.2, blur_sigma=1.0))
  c.vpt.candidates = ml_collections.ConfigDict(dict(num=0, temperature=1.0, kinds=cand_lib.KINDS,
                                                    learner="sample"))
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return vision_config_lib.with_defaults(c)


def _batch(seed, labeled=False, b=B):
  rng = np.random.default_rng(seed)
  out = {"image": rng.uniform(size=(b, SIZE, SIZE, 3)).astype(np.float32)}
  if labeled:
    out["seg"] = rng.integers(0, NUM_CLASSES, (b, SIZE, SIZE)).astype(np.int32)
    out["seg"][:, :2] = 255  # ignored pixels
    out["depth"] = rng.uniform(1.0, 5.0, (b, SIZE, SIZE)).astype(np.float32)
    out["depth"][:, -1] = 0.0  # invalid pixels
  return out


def _batches(seed):
  return _batch(seed), _batch(seed + 100), _batch(seed + 200, True), _batch(seed + 300, True)


def _init(cfg):
  return fast_jit(lambda r, x: vs.init_vision_state(cfg, r, x))(jax.random.PRNGKey(0), _batch(0)["image"])


def _perturb_designer(state, scale=0.5):
  """A U-Net whose zero-initialised output kernel has moved: μ varies and every layer matters."""
  p = state.designer.params
  noise = np.random.default_rng(9).normal(size=p["out"]["kernel"].shape)
  kernel = (scale * noise).astype(p["out"]["kernel"].dtype)
  return state.replace(designer=state.designer.replace(params={**p, "out": {**p["out"], "kernel": kernel}}))


def _leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------- float64 math


_MATH = {}


def _math_state(unet_run):
  """float64 copies of the fixture's student, heads and U-Net; teacher ≠ student, centre ≠ 0 (under x64)."""
  if "state" not in _MATH:
    cfg = vision_config("unet", **{"model.dtype": "float64", "vpt.designer.depth": 1})

    @fast_jit
    def build(state):
      state = jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
      # Deterministic, cheap "noise" (random draws per leaf would dominate the compile time).
      wiggle = lambda x, i: 0.05 * jnp.sin(1.3 * jnp.arange(x.size, dtype=jnp.float64).reshape(x.shape) + i)
      leaves, treedef = jax.tree.flatten(state.student)
      teacher = jax.tree.unflatten(treedef, [x + wiggle(x, i) for i, x in enumerate(leaves)])
      return state.replace(teacher=teacher, center=2 * wiggle(state.center, 0.5))

    _MATH["state"] = (vs.VisionSetup.from_config(cfg), build(unet_run[1]))
  return _MATH["state"]


def _views(seed):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.uniform(size=(2, 3, SIZE, SIZE, 3))), jnp.asarray(rng.uniform(size=(1, 3, 8, 8, 3))))


def _random_like(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), tree)


def test_candidate_values_by_one_vmapped_jvp_equal_per_candidate_backward_dots(unet_run, x64):
  setup, state = _math_state(unet_run)
  setup = dataclasses.replace(setup, cand_cfg=cand_lib.CandidateConfig(kinds=cand_lib.KINDS + ("blocks",)))
  gv, lv = _views(1)
  labeled = jax.tree.map(jnp.asarray, _batch(5, labeled=True, b=3))

  @fast_jit
  def run(state, gv, lv, labeled):
    g_down, down_loss = vs.downstream_grad(setup, state.student, state.heads, labeled)
    patches, grid = vs._backbone_patches(setup, state.student["backbone"], labeled["image"])
    down_plain = vs.downstream_loss(setup, state.heads, patches, grid, labeled)  # the whole backbone, no split
    problem, subset = vs.SSLProblem.build(setup, state.student, state.teacher, state.center, 0, lv)
    cand, losses, values = vs.candidate_meta_values(setup, problem, gv, subset, g_down, jax.random.PRNGKey(4))
    ref = cand_lib.reference_candidate_values(lambda s, v: problem.loss_fn(v)(s), subset, g_down, cand)
    plain = jax.vmap(lambda v: vs.learner_loss(setup, state.student, state.teacher, state.center, v, lv, 0)[0])(cand)
    return g_down, down_loss, down_plain, losses, values, ref, plain

  g_down, down_loss, (down_plain, parts), losses, values, ref, plain = run(state, gv, lv, labeled)
  assert all(k.startswith(("layers_1/", "norm/")) for k in g_down)  # S = the last block + the final norm
  # The prefix-once split computes the same losses as the whole network (L_down = CE + 2·L1; L_DINO).
  np.testing.assert_allclose(down_loss, down_plain, rtol=1e-12)
  np.testing.assert_allclose(down_plain, parts["seg_loss"] + 2.0 * parts["depth_l1"], rtol=1e-12)
  np.testing.assert_allclose(losses, plain, rtol=1e-12)
  assert values.shape == (7,) and len(np.unique(np.round(np.asarray(values), 6))) == 7
  np.testing.assert_allclose(values, ref, rtol=1e-8)


def test_unet_designer_gradient_reverse_over_jvp_equals_double_backward_and_finite_differences(unet_run, x64):
  """The meta objective −V(φ) + λ_s·R_spars(μ_φ) + λ_tv·R_tv(μ_φ): V by one JVP differentiated in reverse
  mode, against V by an explicit backward differentiated by double backward, and central differences."""
  setup, state = _math_state(unet_run)
  gv, lv = _views(2)
  subset, _ = alignment.split_params(state.student["backbone"], 2, setup.n_last)
  g_down = _random_like(subset, 3)
  phi = state.designer.params

  def objective(phi):  # the meta step's objective (reverse-over-JVP)
    problem, subset = vs.SSLProblem.build(setup, state.student, state.teacher, state.center, 0, lv)
    loss, aux = vs.unet_meta_objective(setup, problem, gv, subset, g_down, phi)(phi)
    return loss, aux["value"]

  def reference(phi):  # explicit ⟨g_down, ∇_S L⟩ (nested grad), regularisers written out
    problem, subset = vs.SSLProblem.build(setup, state.student, state.teacher, state.center, 0, lv)
    views, mu = vs.unet_views(setup, phi, gv)
    v = alignment.reference_value(problem.loss_fn(views), subset, g_down)
    return -v + 0.3 * jnp.mean((jnp.mean(mu, axis=(1, 2)) - 0.6) ** 2) + 0.2 * total_variation(mu), v

  value_and_grad = fast_jit(jax.value_and_grad(objective, has_aux=True))
  (loss, v), grad = value_and_grad(phi)
  (loss_ref, v_ref), grad_ref = fast_jit(jax.value_and_grad(reference, has_aux=True))(phi)
  assert abs(float(v)) > 1e-6 and float(total_variation(vs.unet_views(setup, phi, gv)[1])) > 1e-4
  np.testing.assert_allclose(v, v_ref, rtol=1e-10)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-10)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_ref))
  for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grad)[0], jax.tree.leaves(grad_ref)):
    np.testing.assert_allclose(g, r, rtol=1e-8, atol=1e-10 * scale, err_msg=jax.tree_util.keystr(path))
  # Every U-Net layer gets a signal (a conv bias right before a per-channel GroupNorm cannot).
  for path, g in jax.tree_util.tree_flatten_with_path(grad)[0]:
    name = jax.tree_util.keystr(path)
    if "kernel" in name or "GroupNorm" in name:
      assert float(jnp.abs(g).max()) > 1e-8 * scale, name
  # Central differences; a small step because |Δμ| in the TV term has kinks where neighbours are equal.
  eps, phi_np = 1e-7, jax.device_get(phi)
  for seed in (50, 51):
    d = _random_like(phi_np, seed)
    plus = jax.tree.map(lambda p, u: p + eps * u, phi_np, d)
    minus = jax.tree.map(lambda p, u: p - eps * u, phi_np, d)
    fd = (float(value_and_grad(plus)[0][0]) - float(value_and_grad(minus)[0][0])) / (2 * eps)
    analytic = sum(np.vdot(g, u) for g, u in zip(jax.tree.leaves(jax.device_get(grad)), jax.tree.leaves(d)))
    np.testing.assert_allclose(fd, analytic, rtol=1e-6)


def test_detached_teacher_targets_keep_the_value_and_drop_the_teachers_path_from_the_designer_gradient(unet_run, x64):
  """vpt.designer.grad_through_teacher=False (PyTorch DINOLoss's detach): same V(φ), and ∇φV equals the
  exact gradient minus the part through the teacher's targets, i.e. the gradient with the teacher's
  outputs held at their values (checked by giving the teacher's path a zero tangent: the student sees
  views_φ, the teacher views_φ0)."""
  setup, state = _math_state(unet_run)
  gv, lv = _views(4)
  subset, _ = alignment.split_params(state.student["backbone"], 2, setup.n_last)
  g_down = _random_like(subset, 5)
  phi0 = state.designer.params

  def value(setup, phi, teacher_phi):
    problem, subset = vs.SSLProblem.build(setup, state.student, state.teacher, state.center, 0, lv)
    views = vs.unet_views(setup, phi, gv)[0]
    teacher_views = vs.unet_views(setup, teacher_phi, gv)[0]
    # The same loss with separate views for the teacher: patch the teacher's input through `model.apply`.
    teacher_out = setup.model.apply({"params": state.teacher}, vs.normalize(vs._flat(teacher_views)))
    g, b = views.shape[:2]
    h = problem.split.prefix(vs.normalize(vs._flat(views)))
    grid = vs._grid(setup, vs._flat(views))
    loss = lambda s: vs.dino_cross_entropy(jnp.concatenate(
        [problem.split.dino_out(s, h, grid).reshape(g, b, -1),
         problem.split.dino_out(s, problem.local_prefix, problem.local_grid).reshape(problem.n_local, b, -1)]),
        teacher_out.reshape(g, b, -1), problem.center, setup.t_s, problem.t_t, g)
    return jax.jvp(loss, (subset,), (g_down,))[1]

  def designer_value(setup):  # φ ↦ V(φ) as the meta step computes it, for this setup's gradient path
    problem, _ = vs.SSLProblem.build(setup, state.student, state.teacher, state.center, 0, lv)
    return lambda phi: vs.unet_meta_objective(setup, problem, gv, subset, g_down, phi0)(phi)[1]["value"]

  detached = designer_value(dataclasses.replace(setup, grad_through_teacher=False))
  grads = fast_jit(lambda p: (jax.grad(detached)(p), jax.grad(designer_value(setup))(p),
                              jax.grad(lambda q: value(setup, q, jax.lax.stop_gradient(q)))(p),
                              value(setup, p, p), detached(p)))
  g_detached, g_exact, g_ref, v_ref, v_detached = grads(phi0)
  np.testing.assert_allclose(v_detached, v_ref, rtol=1e-10)
  for a, r in zip(jax.tree.leaves(g_detached), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, r, rtol=1e-8, atol=1e-14)
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g_detached), jax.tree.leaves(g_exact))) > 1e-8


# ----------------------------------------------------------------------------- DINO baseline


def _float64(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def test_mode_dino_is_a_plain_dino_step_built_by_hand(unet_run, x64):
  """Two separately compiled programs of the same math, compared in float64: in float32 their
  different fusion/summation orders differ by a few ulps, which Adam's normalised first steps can
  amplify past any fixed small tolerance (seen: 5.8e-5 relative on 1 of 256 elements). The step's
  schedule values (teacher temperature, EMA momentum) are float32 by design; the reference uses
  the same float32 values."""
  cfg = vision_config("dino", **{"dino.n_local_crops": 0,  # local crops: covered by the float64 tests
                                 "model.dtype": "float64"})
  # init_vision_state draws the same learner for every mode; "dino" has no heads and no designer.
  state = _float64(unet_run[1].replace(heads=None, designer=None))
  assert jax.tree.structure(state) == jax.tree.structure(jax.eval_shape(
      lambda: vs.init_vision_state(cfg, jax.random.PRNGKey(0), _batch(0)["image"])))
  step = fast_jit(vs.make_vision_train_step(cfg))

  # By hand: the contract's crops, DINO loss, AdamW (warmup-cosine, decay on matrices), EMA, centering.
  model = dino.DINOModel(ViTConfig(image_size=SIZE, patch_size=4, d_model=16, n_layers=2, n_heads=2,
                                   dtype="float64"),
                         dino.DINOHeadConfig(out_dim=32, hidden_dim=16, bottleneck_dim=8))
  crops = vv.MultiCropConfig(global_size=SIZE, local_size=8, n_global=2, n_local=0, blur_sigma=(0.1, 1.0))
  lr = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 0, NUM_STEPS, 0.0)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.04,
                                                               mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))

  @fast_jit
  def by_hand(student, teacher, center, opt_state, step, rng, images):
    key = jax.random.fold_in(jax.random.fold_in(rng, step), 0)
    global_views, local_views = vv.multi_crop(key, images, crops)
    apply = lambda p, x: model.apply({"params": p}, vv.normalize(x))

    def loss_fn(s):
      out_s = jnp.concatenate([apply(s, v) for v in global_views] + [apply(s, v) for v in local_views])
      out_t = jnp.stack([apply(teacher, v) for v in global_views])
      log_p = jax.nn.log_softmax(out_s.reshape(2, B, -1) / 0.1, axis=-1)
      q = jax.nn.softmax((out_t - center) / jnp.float32(0.04), axis=-1)  # T_t: a float32 schedule value
      pairs = [(0, 1), (1, 0)]
      return sum(-jnp.mean(jnp.sum(q[g] * log_p[v], -1)) for g, v in pairs) / len(pairs), out_t

    (loss, out_t), grads = jax.value_and_grad(loss_fn, has_aux=True)(student)
    # The teacher (and the centre) get no gradient through the learner's loss.
    g_teacher = jax.grad(lambda t, c: vs.learner_loss(vs.VisionSetup.from_config(cfg), student, t, c,
                                                      global_views, local_views, step)[0], argnums=(0, 1))(teacher,
                                                                                                          center)
    updates, opt_state = opt.update(grads, opt_state, student)
    student = optax.apply_updates(student, updates)
    # The momentum schedule is float32 too (DINO's cosine schedule, in its order of operations).
    m = 1.0 + 0.5 * (0.996 - 1.0) * (1.0 + jnp.cos(math.pi * (step.astype(jnp.float32) / NUM_STEPS)))
    teacher = jax.tree.map(lambda t, s: m * t + (1 - m) * s, teacher, student)
    center = 0.9 * center + 0.1 * jnp.mean(out_t, axis=(0, 1))
    return student, teacher, center, opt_state, loss, g_teacher

  ref = state
  for i in range(2):
    images = _float64(_batch(10 + i)["image"])
    state, metrics = step(state, {"image": images})
    student, teacher, center, opt_state, loss, g_teacher = by_hand(
        ref.student, ref.teacher, ref.center, ref.opt_state, ref.step, ref.rng, images)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_teacher))
    np.testing.assert_allclose(metrics["loss"], loss, rtol=2**-23)  # the metric is reported in float32
    for got, want in zip(jax.tree.leaves((state.student, state.teacher, state.center, state.opt_state)),
                         jax.tree.leaves((student, teacher, center, opt_state))):
      assert got.dtype == want.dtype != np.float32
      # float64 rounding (2^-53) over a few hundred operations; leaves whose exact gradient is zero hold
      # rounding noise (< 1e-16 absolute), hence atol. (A float64 T_t instead of the float32 one is 1e-8 off.)
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
    ref = ref.replace(step=ref.step + 1, student=student, teacher=teacher, center=center, opt_state=opt_state)
  assert not _leaves_equal(state.teacher, state.student)  # the EMA lags the student
  assert int(state.step) == 2 and float(metrics["learning_rate"]) > 0 and metrics.keys() >= {"loss", "grad_norm"}


# ----------------------------------------------------------------------------- the V-Pretraining step


@pytest.fixture(scope="module")
def unet_run():
  """Mode "unet" with a designer that cannot move (learning rate 0): φ is fixed, the meta step runs."""
  cfg = vision_config("unet", **{"vpt.designer.learning_rate": 0.0, "dino.n_local_crops": 0,
                                 "vpt.designer.depth": 1})
  train_step = vs.make_vision_train_step(cfg)
  return cfg, _perturb_designer(_init(cfg)), fast_jit(train_step), train_step


def test_host_dispatched_programs_equal_the_single_cond_program(x64):
  """The loop runs make_vision_train_step(meta=True) on meta steps and (meta=False) otherwise; over a
  meta and a non-meta step (a moving designer, burn-in 0, meta every 2) they equal the lax.cond program.
  float64 compute and state: Adam's first designer step is ≈ lr·sign(g), which float32 rounding can
  flip where g ≈ 0. Metrics are reported in float32 (their rounding: rtol 2^-23)."""
  cfg = vision_config("unet", **{"dino.n_local_crops": 0, "vpt.designer.depth": 1, "model.dtype": "float64"})
  cond = fast_jit(vs.make_vision_train_step(cfg))
  by_step = {m: fast_jit(vs.make_vision_train_step(cfg, meta=m)) for m in (True, False)}
  init = _perturb_designer(_init(cfg))
  a = b = _float64(init).replace(designer=_float64(init.designer).replace(last_meta=init.designer.last_meta))
  for i, meta in enumerate((True, False)):
    batches = _float64(_batches(i))
    a, ma = cond(a, *batches)
    b, mb = by_step[meta](b, *batches)
    assert float(ma["meta/is_meta_step"]) == float(mb["meta/is_meta_step"]) == float(meta)
    for x, y in zip(jax.tree.leaves(a.replace(designer=a.designer.replace(last_meta=None))),
                    jax.tree.leaves(b.replace(designer=b.designer.replace(last_meta=None)))):
      assert x.dtype == y.dtype != np.float32
      np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-14)  # float64 rounding; atol: exact-zero gradients
    for x, y in zip(jax.tree.leaves(a.designer.last_meta), jax.tree.leaves(b.designer.last_meta)):
      np.testing.assert_allclose(x, y, rtol=2**-23, atol=1e-30)  # float32 metrics of float64 values
    for k in ma:
      np.testing.assert_allclose(ma[k], mb[k], rtol=2**-23, atol=1e-30, err_msg=k)
  assert not _leaves_equal(_init(cfg).designer.params, b.designer.params)  # the designer moved


def _relabel(batch):
  out = dict(batch)
  out["seg"] = np.where(batch["seg"] == 255, 255, (batch["seg"] + 2) % NUM_CLASSES).astype(np.int32)
  out["depth"] = (batch["depth"] * 1.7 + 0.3 * (batch["depth"] > 0)).astype(np.float32)
  return out


def test_learner_update_does_not_depend_on_labels_with_the_designer_fixed(unet_run):
  cfg, state, step, _ = unet_run
  b_u, b_meta, b_train, b_fb = _batches(0)
  assert int(state.step) == 0  # a meta step, with a non-zero learning rate (no warmup)
  s1, m1 = step(state, b_u, b_meta, b_train, b_fb)
  s2, m2 = step(state, b_u, b_meta, _relabel(b_train), _relabel(b_fb))
  assert float(m1["meta/is_meta_step"]) == 1.0 and float(m1["learning_rate"]) > 0
  # The labels were read: the downstream loss, the value, φ's gradient and the heads all changed...
  for k in ("meta/down_loss", "meta/value", "meta/designer_grad_norm", "meta/head_seg_loss", "meta/head_depth_l1"):
    assert float(m1[k]) != float(m2[k]), k
  assert not _leaves_equal(s1.heads, s2.heads)
  # ...yet with φ fixed (learning rate 0) the learner's update is bit-identical.
  assert _leaves_equal(s1.designer.params, state.designer.params)
  assert not _leaves_equal(s1.student, state.student)
  for a, b in [(s1.student, s2.student), (s1.teacher, s2.teacher), (s1.center, s2.center),
               (s1.opt_state, s2.opt_state)]:
    assert _leaves_equal(a, b)


def test_heads_refresh_only_in_the_meta_step_and_plain_steps_read_no_feedback_batch(unet_run):
  """PAPER §5: the heads are refreshed inside the meta step. On a plain step (step 1, meta every 2)
  the heads and designer stay as they were and the meta/labeled batches are not read: NaN batches
  give a bit-identical step."""
  cfg, state, step, _ = unet_run
  state = state.replace(step=jnp.ones_like(state.step))
  b_u, b_meta, b_train, b_fb = _batches(5)
  nan = lambda b: jax.tree.map(lambda x: np.full_like(x, np.nan) if x.dtype.kind == "f" else x, b)
  s1, m1 = step(state, b_u, b_meta, b_train, b_fb)
  s2, m2 = step(state, b_u, nan(b_meta), nan(b_train), nan(b_fb))
  assert float(m1["meta/is_meta_step"]) == 0.0
  assert _leaves_equal(s1.heads, state.heads) and _leaves_equal(s1.designer.params, state.designer.params)
  assert not _leaves_equal(s1.student, state.student)
  assert _leaves_equal(s1, s2)
  # The meta step refreshes them: `feedback.head_steps` head updates on the labeled-train batch.
  s3, _ = step(state.replace(step=jnp.zeros_like(state.step)), b_u, b_meta, b_train, b_fb)
  assert not _leaves_equal(s3.heads, state.heads)


def test_learner_has_zero_derivative_with_respect_to_the_labels(unet_run):
  """d(learner after the step)/d(depth labels) == 0 exactly, while the step's downstream loss does
  depend differentiably on them (so the derivative is really taken through the step)."""
  cfg, state, _, step = unet_run
  b_u, b_meta, b_train, b_fb = _batches(3)

  def fn(depth_fb, depth_train):
    new, metrics = step(state, b_u, b_meta, {**b_train, "depth": depth_train}, {**b_fb, "depth": depth_fb})
    return (new.student, new.teacher, new.center), metrics["meta/down_loss"]

  tangents = (jnp.ones_like(b_fb["depth"]), jnp.ones_like(b_train["depth"]))
  d_learner, d_down = fast_jit(lambda a, b: jax.jvp(fn, (a, b), tangents)[1])(b_fb["depth"], b_train["depth"])
  assert all(np.all(np.asarray(t) == 0) for t in jax.tree.leaves(d_learner))
  assert abs(float(d_down)) > 1e-4


def test_sharded_step_matches_single_device(unet_run):
  cfg, state, step, _ = unet_run
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1)), jax.devices()[:8])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  shards = vs.vision_state_shardings(cfg, abstract, mesh)
  assert shards.student["backbone"]["layers_0"]["attention"]["q_proj"]["kernel"].spec[0] == "fsdp"
  sharded_step = vs.jit_vision_train_step(cfg, mesh, shards, donate=False, compiler_options=FAST,
                                          train_step=unet_run[3])
  put = lambda b: jax.device_put(b, sharding.batch_sharding(mesh))
  single, sharded = state, jax.device_put(state, shards)
  for i in range(2):  # a meta step, then a plain one
    batches = _batches(20 + i)
    single, m_single = step(single, *batches)
    sharded, m_sharded = sharded_step(sharded, *[put(b) for b in batches])
  assert len(sharded.student["backbone"]["layers_0"]["mlp"]["fc1"]["kernel"].sharding.device_set) == 8
  for k in m_single:
    np.testing.assert_allclose(m_sharded[k], m_single[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # Parameters to 1e-5: Adam's first steps are ≈ lr·sign(g), so a gradient component near zero may
  # round differently under another reduction order (≤ 2e-6 observed at lr 1e-3).
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(sharded))[0], jax.tree.leaves(single)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- candidates and errors


@pytest.mark.slow  # two candidate meta programs compiled
def test_random_feedback_is_a_control_of_either_designer():
  """vpt.feedback_direction='random' with the candidate designer (the older mode 'random_feedback' knew
  the U-Net only): the meta step aligns with a random direction of g_down's norm, so the candidates'
  values and the designer's weights move differently; the U-Net spelling is the older mode's setup."""
  unet_random = vs.VisionSetup.from_config(vision_config("unet", **{"vpt.feedback_direction": "random"}))
  old_name = vs.VisionSetup.from_config(vision_config("random_feedback"))
  assert unet_random.random_feedback and old_name.random_feedback and unet_random.unet_cfg == old_name.unet_cfg
  results = {}
  for direction in ("feedback", "random"):
    cfg = vision_config("candidates", **{"vpt.feedback_direction": direction, "dino.n_local_crops": 0})
    state, metrics = fast_jit(vs.make_vision_train_step(cfg, meta=True))(_init(cfg), *_batches(0))
    results[direction] = jax.device_get((state.designer.params, metrics))
  (phi_true, m_true), (phi_random, m_random) = results["feedback"], results["random"]
  np.testing.assert_allclose(m_random["meta/g_down_norm"], m_true["meta/g_down_norm"], rtol=1e-6)
  assert not np.array_equal(phi_true["logits"], phi_random["logits"])
  with pytest.raises(ValueError, match="config.vpt.feedback_direction='random': expected 'feedback' with "
                                       "vpt.mode='dino'"):
    vision_config_lib.validate_vision(vision_config("dino", **{"vpt.feedback_direction": "random"}))


def test_candidate_views_follow_their_definitions_and_weights_and_sampling():
  cfg = cand_lib.CandidateConfig(kinds=("identity", "blur_all", "center", "border", "blocks", "zoom"),
                                 center_frac=0.5, temperature=0.5)
  side = SIZE * math.sqrt(0.5)
  zoom_box = ((SIZE - side) / 2, (SIZE - side) / 2, side, side)
  logits, values = jnp.asarray([0.3, -0.1, 0.0, 0.5, 0.2, -0.4]), jnp.asarray([1.0, -2.0, 0.5, 3.0, 0.0, 1.0])

  @fast_jit
  def run(gv):
    cand = cand_lib.candidate_views(jax.random.PRNGKey(0), gv, cfg)
    blurred = vv.gaussian_blur(gv.reshape(8, SIZE, SIZE, 3), 1.0, 3).reshape(gv.shape)
    zoom = vv.resized_crop(gv[0, 0], zoom_box, SIZE)
    grad = jax.grad(lambda a: cand_lib.candidate_objective(a, values, cfg)[0])(logits)
    views, choice = cand_lib.sample_candidates(jax.random.PRNGKey(1), cand, jnp.full((6,), 1 / 6))
    return cand, blurred, zoom, grad, views, choice

  gv = np.random.default_rng(6).uniform(size=(2, 4, SIZE, SIZE, 3)).astype(np.float32)
  cand, blurred, zoom, grad, views, choice = jax.device_get(run(gv))
  np.testing.assert_array_equal(cand[0], gv)
  np.testing.assert_allclose(cand[1], blurred, rtol=1e-6)
  inside = np.zeros((SIZE, SIZE), bool)
  inside[4:12, 4:12] = True
  np.testing.assert_allclose(cand[2][:, :, inside], gv[:, :, inside], rtol=1e-6)
  np.testing.assert_allclose(cand[2][:, :, ~inside], blurred[:, :, ~inside], rtol=1e-6)
  np.testing.assert_allclose(cand[3][:, :, inside], blurred[:, :, inside], rtol=1e-6)
  np.testing.assert_allclose(cand[3][:, :, ~inside], gv[:, :, ~inside], rtol=1e-6)
  keep = np.isclose(cand[4], gv, atol=1e-6).all(-1)  # blocks: every 4x4 block is either v or Blur(v)
  np.testing.assert_allclose(cand[4], np.where(keep[..., None], gv, blurred), atol=1e-6)
  blocks = keep.reshape(2, 4, 4, 4, 4, 4).transpose(0, 1, 2, 4, 3, 5).reshape(2, 4, 16, 16)
  assert np.all(blocks.all(-1) | ~blocks.any(-1)) and 0 < keep.mean() < 1
  np.testing.assert_allclose(cand[5][0, 0], zoom, rtol=1e-5)
  # The table's gradient is the softmax policy gradient: −w_c (V_c − Σ w V) / τ.
  w = np.exp(np.asarray(logits) / 0.5) / np.exp(np.asarray(logits) / 0.5).sum()
  np.testing.assert_allclose(grad, -w * (values - np.sum(w * values)) / 0.5, rtol=1e-5, atol=1e-7)
  # Sampling picks one candidate per image, for both of its global crops.
  for b in range(4):
    np.testing.assert_array_equal(views[:, b], cand[int(choice[b]), :, b])


def test_every_mode_reads_the_base_vision_config_and_bad_values_raise_clear_errors(unet_run):
  from vpt.vision.config import vision_base_config  # noqa: PLC0415 (the loop's schema, engineer B's)
  for mode in vs.MODES:
    config = vision_base_config()
    config.vpt.mode = mode
    setup = vs.VisionSetup.from_config(config)
    assert (setup.unet_cfg is not None) == (mode in vs.UNET_MODES)
    assert (setup.cand_cfg is not None) == (mode == "candidates")
  # Bad values are the validator's (once per run, train_vision.prepare_config); the setup trusts it.
  for overrides, message in [(dict(mode="soft"), "config.vpt.mode='soft'"),
                             ({"vpt.align_last_n_layers": 3}, "align_last_n_layers=3"),
                             ({"vpt.align": "l2"}, "config.vpt.align='l2'"),
                             (dict(mode="candidates", **{"vpt.candidates.num": 4}), "candidates.num=4")]:
    with pytest.raises(ValueError, match=message):
      vision_config_lib.validate_vision(vision_config(**overrides))
  with pytest.raises(ValueError, match="unknown kinds"):
    vs.VisionSetup.from_config(vision_config("candidates", **{"vpt.candidates.kinds": ("identity", "mixup")}))
  with pytest.raises(ValueError, match="no field 'lambda_tv'.*with_defaults"):  # a partial config: named, not guessed
    partial = vision_base_config()
    del partial.vpt.designer["lambda_tv"]
    vs.VisionSetup.from_config(partial)
  cfg, state, _, _ = unet_run
  with pytest.raises(ValueError, match="batch_labeled_meta is required"):
    vs.make_vision_train_step(cfg)(state, _batch(0), _batch(1), _batch(2, True), None)
