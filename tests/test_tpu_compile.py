"""TPU programs without a TPU: slice names, libtpu's compile-only devices, and the real nano train
steps (language NTP and V-Pretraining, vision DINO + U-Net designer) compiled for a v5e 2x2 slice and
for 2 slices over DCN: they compile, take and return the shardings asked for, alias the donated
state, and the report's parameter bytes are the analytic count."""

import os

import jax
import numpy as np
import pytest

from vpt import aot
from vpt.core import config as core_config, tpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def no_persistent_cache():
  """Compile without conftest's persistent XLA cache: libtpu's compile-only client writes entries it
  cannot load back ("PjRtCompiler must be constructed with a Client to call DeserializeLoadedExecutable")."""
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  before = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()  # whether the cache is used is decided once per process, then kept
  yield
  jax.config.update("jax_enable_compilation_cache", before)
  compilation_cache.reset_cache()


def _lm(mode, **overrides):
  config = core_config.load_config_file(os.path.join(REPO, "experiments", "lm_vpt.py"), f"nano,{mode}")
  base = {"model.vocab_size": 96, "mesh.num_devices": 0, "data.seq_len": 32, "feedback.seq_len": 32}
  return core_config.with_overrides(config, {**base, **overrides})


def _analytic_lm_params(m, vocab):
  """Qwen2-style decoder: embedding (+ untied head), per block q/k/v (with biases) and o, gated MLP, 2 norms."""
  hd = m.head_dim or m.d_model // m.n_heads
  q, kv = m.n_heads * hd, m.n_kv_heads * hd
  block = m.d_model * (q + 2 * kv) + (q + 2 * kv) + q * m.d_model + 3 * m.d_model * m.d_ff + 2 * m.d_model
  return vocab * m.d_model * (1 if m.tie_embeddings else 2) + m.n_layers * block + m.d_model


def _assert_compiled_with(report):
  """The compiled step takes and returns the state in exactly the shardings asked for, and donates it."""
  compiled, want = report["compiled"], report["state_shardings"]
  (state_in, *_), _ = compiled.input_shardings
  state_out = compiled.output_shardings[0]
  for got in (state_in, state_out):
    leaves_got, leaves_want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(leaves_got) == len(leaves_want)
    for g, w in zip(leaves_got, leaves_want):
      assert g.spec == w.spec and g.mesh.devices.tolist() == w.mesh.devices.tolist(), (g, w)
  assert report["devices"].endswith("tpu")
  assert report["aliased"] > 0 and report["aliased"] >= report["params"] + report["opt_state"]


def test_slice_names_follow_cloud_tpu():
  """v4 / v5p sizes count TensorCores (2 per chip), v5e / v6e count chips."""
  want = {"v4-8": ("v4:2x2x1", 4), "v4-32": ("v4:2x2x4", 16), "v5p-8": ("v5:2x2x1", 4), "v5p-64": ("v5:2x4x4", 32),
          "v5p-128": ("v5:4x4x4", 64), "v5e-4": ("v5e:2x2", 4), "v5e-8": ("v5e:2x4", 8), "v5e-16": ("v5e:4x4", 16),
          "v5e-256": ("v5e:16x16", 256), "v6e-8": ("v6e:2x4", 8), "v5litepod-16": ("v5e:4x4", 16)}
  for name, (topology, chips) in want.items():
    sl = tpu.parse_slice(name)
    assert (sl.topology_name, sl.num_chips) == (topology, chips), name
  assert tpu.parse_slice("v5p-384", "4x4x12").topology_name == "v5:4x4x12"
  assert tpu.parse_slice("v5e-16", num_slices=2).num_chips == 32
  for bad, shape, match in (("v5p-384", "", "dry_run_topology_shape"), ("v4-7", "", "even"),
                            ("v5e-16", "2x4", "has 8 chips"), ("v5e-16", "2x2x4", "2-D"), ("tpu-8", "", "generation")):
    with pytest.raises(ValueError, match=match):
      tpu.parse_slice(bad, shape)


def test_missing_libtpu_says_how_to_install(monkeypatch):
  from jax._src import xla_bridge
  monkeypatch.setattr(xla_bridge, "get_tpu_library_path", lambda: None)
  with pytest.raises(RuntimeError, match=r'pip install -e "\.\[tpu\]"'):
    tpu.compile_only_devices(tpu.parse_slice("v5e-4"))


def test_dry_run_estimate_flag_reaches_the_dry_run(monkeypatch):
  """`--dry_run_estimate=false` compiles for the memory verdict only (the paper-scale programs take
  minutes each to compile on a small host); by default the estimate's programs are compiled too."""
  from absl.testing import flagsaver
  from vpt import main as vpt_main
  calls = []
  monkeypatch.setattr(aot, "dry_run", lambda config, **kw: calls.append(kw))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  spec = "--config=" + os.path.join(REPO, "experiments", "lm_vpt.py") + ":nano,ntp"
  for extra in ([], ["--dry_run_estimate=false"]):
    with flagsaver.flagsaver():
      vpt_main._parse_flags(["vpt", spec, "--dry_run", "--dry_run_topology=v5e-4", *extra])
      vpt_main._dry_run(vpt_main._CONFIG.value)
  assert [(c["topology"], c["estimate"]) for c in calls] == [("v5e-4", True), ("v5e-4", False)]


def test_vision_chips_option_keeps_the_batches_and_fills_the_slice():
  """ViT-L's 50 images do not divide 8 chips: chips=8 is data 2 × tensor 4; the DINO baseline has no
  meta / feedback batch, so a batch that 8 divides is all data parallel."""
  path = os.path.join(REPO, "experiments", "vision_dino.py")
  for arg, want in (("vitl,unet,chips=8", (2, 1, 4)), ("vitb,dino,chips=4", (2, 1, 2)), ("nano,dino,chips=8", (8, 1, 1)),
                    ("vitl,unet", (-1, 1, 1))):
    config = core_config.load_config_file(path, arg)
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == want, arg
    assert config.batch_size == {"vitl": 50, "vitb": 50, "nano": 8}[arg.split(",")[0]]
  with pytest.raises(ValueError, match="chips=N"):
    core_config.load_config_file(path, "vitl,unet,chips=0")


def test_qwen_micro_option_keeps_the_global_batch():
  """micro=2 (Qwen1.5-7B on 16 GiB v5e chips) halves each device's micro-batch and doubles the
  accumulation; the global batch of 128 stays, the feedback / meta batch is one global micro-batch."""
  path = os.path.join(REPO, "experiments", "qwen.py")
  for arg, want in (("qwen1.5-7b,dp=16", (128, 2, 64)), ("qwen1.5-7b,dp=16,micro=2", (128, 4, 32)),
                    ("qwen1.5-7b,ntp,dp=16,micro=2", (128, 4, 32))):
    config = core_config.load_config_file(path, arg)
    got = (config.batch_size, config.grad_accum_steps, config.batch_size // config.grad_accum_steps)
    assert got == want, arg
    assert config.vpt.meta_batch_size == config.feedback.batch_size == want[2], arg
  with pytest.raises(ValueError, match="micro=M"):
    core_config.load_config_file(path, "qwen1.5-7b,micro=0")


def test_collectives_are_counted_per_step_and_split_into_ici_and_dcn():
  """A while body's collectives run trip-count times; what crosses slices goes over DCN."""
  hlo = """HloModule m, num_partitions=4

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = f32[8]{0} all-gather(f32[4]{0} %x), channel_id=1, replica_groups=[2,2]<=[4], dimensions={0}
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %c = pred[] constant(true)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ar = bf16[16]{0} all-reduce(bf16[16]{0} %y), channel_id=2, replica_groups=[2,2]<=[2,2]T(1,0), to_apply=%add
  %send = (f32[1,8,128]{2,1,0}, u32[], token[]) send(%b, %a), channel_id=4, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  %recv = (f32[1,8,128]{2,1,0}, u32[], token[]) recv(%a), channel_id=5, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  %cp = f32[2]{0} collective-permute(f32[2]{0} %z), channel_id=3, source_target_pairs={{0,1},{1,0}}
}
"""
  out = aot.hlo_collectives(hlo, partition_slices=[0, 0, 1, 1])
  ag, ar, cp = out["all-gather"], out["all-reduce"], out["collective-permute"]
  assert (ag["count"], ag["bytes"], ag["ici_traffic"], ag["dcn_traffic"]) == (3, 3 * 32, 3 * 16, 0)  # {0,1},{2,3}
  # {0,2},{1,3} spans the slices: 2 × 32 × 1/2; the multi-slice form (a send to the DCN runtime, its
  # recv not counted again) 2 × 4096 × 1/2 between 2 slices.
  assert (ar["count"], ar["bytes"], ar["dcn_traffic"], ar["dcn_count"]) == (2, 32 + 4096, 32 + 4096, 2)
  assert (cp["count"], cp["ici_traffic"]) == (1, 8)
  mesh_form = ("%x = f32[4]{0} all-gather(%y), replica_groups=mesh['axis_0'=2,'axis_1'=2], "
               "device_ids=([2,2]T(1,0)) {'axis_0'}, dimensions={0}")
  assert aot.replica_groups(mesh_form, 4).tolist() == [[0, 1], [2, 3]]
  assert aot.replica_groups(mesh_form.replace(", device_ids=([2,2]T(1,0))", ""), 4).tolist() == [[0, 2], [1, 3]]


@pytest.mark.slow
def test_nano_lm_ntp_on_v5e_2x2_and_on_two_slices():
  """Data parallel over the 4 chips (replicated parameters: exactly 4 bytes per analytic parameter), then
  2 slices with the data axis over DCN and fsdp inside each slice: the gradient reduction crosses slices."""
  config = _lm("ntp", **{"mesh.data": 4, "mesh.fsdp": 1})
  report = aot.dry_run(config, topology="v5e-4", estimate=False, echo=False)
  _assert_compiled_with(report)
  m = config.model
  n = _analytic_lm_params(m, 96)
  assert report["num_params"] == n and report["params"] == 4 * n
  assert report["opt_state"] >= 2 * 4 * n and report["fits"] and report["budget"] == 16 * aot.GB

  config = _lm("ntp", **{"mesh.data": 2, "mesh.fsdp": 4})
  report = aot.dry_run(config, topology="v5e-4", num_slices=2, estimate=False, echo=False)
  _assert_compiled_with(report)
  mesh = report["compiled"].input_shardings[0][0].params["embed_tokens"]["embedding"].mesh
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert (slices[0] == 0).all() and (slices[1] == 1).all()  # data (DCN) spans the slices, fsdp stays inside
  costs = aot.program_costs(report["compiled"], mesh, tpu.CHIPS["v5e"])
  assert costs["dcn_traffic"] > 0 and costs["ici_traffic"] > 0
  assert costs["flops"] > 0 and costs["bytes_accessed"] > 0


@pytest.mark.slow
def test_nano_v_pretraining_on_v5e_2x2_with_the_estimate():
  """The one-program V-Pretraining step (meta update under lax.cond) on data 2 × fsdp 2, and the
  estimate's forced meta / plain programs and NTP baseline: the meta step costs more than the plain one."""
  config = _lm("value", **{"mesh.data": 2, "mesh.fsdp": 2})
  report = aot.dry_run(config, topology="v5e-4", echo=False)
  _assert_compiled_with(report)
  assert report["params"] < 4 * report["num_params"]  # fsdp shards the kernels
  assert report["designer"] > 0
  est = report["estimate"]
  p = est["programs"]
  assert set(p) == {"meta", "plain", "baseline"} and set(report["compile_seconds"]) == {"step", "meta", "plain", "ntp"}
  assert p["meta"]["flops"] > p["plain"]["flops"] > 0 and p["baseline"]["flops"] > 0
  assert p["meta"]["collectives"]["all-gather"]["count"] > 0  # fsdp gathers the weights
  r = config.vpt.meta_every
  assert est["step_seconds"] == pytest.approx(((r - 1) * p["plain"]["step_seconds"] + p["meta"]["step_seconds"]) / r)
  assert est["v_over_baseline"] == pytest.approx(p["baseline"]["step_seconds"] / est["step_seconds"])
  assert 0 < est["v_over_baseline"] < 1
  text = aot.format_report(report)
  for row in ("meta step", "plain step", "NTP baseline", "collectives: all-gather", "predicted throughput ÷ NTP",
              "not a measurement"):
    assert row in text


@pytest.mark.slow
def test_nano_vision_unet_on_v5e_2x2():
  """Both programs of the vision loop (plain, meta) compile for TPU with the state's shardings."""
  config = core_config.load_config_file(os.path.join(REPO, "experiments", "vision_dino.py"), "nano,unet")
  config = core_config.with_overrides(config, {"mesh.data": 4})
  report = aot.dry_run(config, topology="v5e-4", estimate=False, echo=False)
  _assert_compiled_with(report)
  assert set(report["programs_peak"]) == {"plain", "meta"}
  assert report["peak"] == max(report["programs_peak"].values())
  from vpt.vision.models.vit import ViT, ViTConfig, count_params
  vit = ViT(ViTConfig.from_config(config.model))
  backbone = jax.eval_shape(vit.init, jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))["params"]
  assert report["num_params"] == count_params(backbone)
  assert report["params"] > 4 * report["num_params"]  # + the DINO head, replicated over data
  assert report["teacher"] == report["params"] and report["designer"] > 0
