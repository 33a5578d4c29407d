"""Tensor parallelism: fused projections keep their split dimension whole (`layers.FusedLinear`), and a
train step sharded over `model` (with `data` / `fsdp`) equals the one-device step.

The default test reads the layout off the abstract model (no compile, < 1 s); the slow ones train on 8
simulated CPU devices in a subprocess.
"""

import json
import os
import subprocess
import sys
import textwrap

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P
import numpy as np
import pytest

from zoo_jax import sharding
from zoo_jax.mixers import registry
from zoo_jax.model import LanguageModel, ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, L = 32, 16

# mixer config -> (fused parameter's path in the mixer, number of parts, mesh axis of its split dimension)
FUSED = [
    ({"name": "attention", "num_heads": 4}, "qkv_proj", 3),
    ({"name": "sliding_window", "num_heads": 4, "window_size": 4}, "qkv_proj", 3),
    ({"name": "h3", "head_dim": 8}, "qkv_proj", 3),
    ({"name": "retnet", "num_heads": 4}, "in_proj", 4),
    ({"name": "mamba"}, "in_proj", 2),
    ({"name": "s4d"}, "output_linear", 2),
]
# Fused projections whose parts have unequal widths or meet a short conv before the split: replicated
# over `model`.
REPLICATED = [({"name": "hyena"}, "in_proj"), ({"name": "gla", "num_heads": 2}, "qkv_proj"),
              ({"name": "delta_net", "num_heads": 2}, "in_proj"), ({"name": "mamba2"}, "in_proj")]


def mesh_spec(cfg: dict, path: str, model: int = 2) -> tuple[P, tuple[int, ...]]:
  """The mesh PartitionSpec and shape of the mixer's `path`.kernel on a (1, 1, 2, model) mesh."""
  mixer = nnx.eval_shape(lambda: registry.build(cfg, d_model=D, seq_len=L, layer_idx=0, n_layers=2,
                                                rngs=nnx.Rngs(0)))
  kernel = getattr(mixer, path).kernel
  spec = nnx.get_partition_spec(nnx.state(getattr(mixer, path), nnx.Param))["kernel"].value
  mesh = AbstractMesh((1, 1, 2, model), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
  return sharding.logical_to_mesh(spec, kernel.shape, mesh), kernel.shape


@pytest.mark.parametrize("cfg,path,parts", FUSED, ids=[c["name"] for c, _, _ in FUSED])
def test_fused_projection_shards_keep_every_part_whole(cfg, path, parts):
  """The kernel is (d, parts, ...) with the parts dimension unsplit and the next one over `model`: each of
  the 2 model shards holds the same channels (heads) of every part, as the flat (d, parts·c) layout's
  columns {i·c + j : j in the shard's channels, every part i}."""
  spec, shape = mesh_spec(cfg, path)
  assert shape[:2] == (D, parts), shape
  assert tuple(spec)[:3] == ("fsdp", None, "model"), spec  # embed over fsdp, parts whole, channels split
  per_part = int(np.prod(shape[2:]))
  flat_columns = np.arange(parts * per_part).reshape(shape[1:])  # the flat layout's column of each entry
  for shard in np.split(flat_columns, 2, axis=1):  # what one `model` shard holds
    part_of_column = shard.reshape(-1) // per_part
    channel_of_column = shard.reshape(-1) % per_part
    assert sorted(set(part_of_column)) == list(range(parts))  # every part ...
    for i in range(parts):  # ... for the same channels
      np.testing.assert_array_equal(np.sort(channel_of_column[part_of_column == i]),
                                    np.sort(channel_of_column[part_of_column == 0]))


@pytest.mark.parametrize("cfg,path", REPLICATED, ids=[c["name"] for c, _ in REPLICATED])
def test_unequal_fused_projections_are_replicated_over_model(cfg, path):
  spec, _ = mesh_spec(cfg, path)
  assert "model" not in tuple(spec) and tuple(spec)[0] == "fsdp", spec


_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import json, sys
    import jax, numpy as np
    from zoo_jax import config as config_lib, sharding, tasks, trainer
    assert jax.device_count() == 8, jax.devices()
    cfg, model_cfg = config_lib.resolve(json.loads(sys.argv[1]))
    fused = sys.argv[2]

    def run(mesh):
      task = tasks.MQARTask(cfg, [0])
      _, state, sh, step = trainer.single_step(task, model_cfg, cfg.train, mesh, seed=0, total_steps=10)
      losses = []
      for batch, _ in zip(task.train_batches(0), range(2)):
        state, m = step(state, sharding.put(batch, sh.batch))
        losses.append(float(m["loss"][0]))
      kernel = state["params"]["blocks"][0]["mixer"][fused]["kernel"]
      shards = [[[s.start, s.stop] for s in shard.index[1:]] for shard in kernel.addressable_shards]
      params = jax.tree.map(lambda x: np.asarray(x).tolist(), state["params"])
      return dict(losses=losses, spec=[str(a) for a in getattr(kernel.sharding, "spec", ())],
                  shape=list(kernel.shape[1:]), shards=shards, params=params)

    single = run(sharding.make_mesh(devices=jax.devices()[:1]))
    sharded = run(sharding.make_mesh(data=2, fsdp=2, model=2))
    print(json.dumps(dict(single=single, sharded=sharded)))
""")


def _tiny_config(mixer: dict) -> dict:
  segments = [dict(seq_len=L, num_kv_pairs=2, num_examples=64)]
  return {"data": dict(vocab_size=64, train_segments=segments, validation_segments=segments,
                       test_segments=segments),
          "model": dict(d_model=D, n_layers=2, mixer=mixer, state_mixer="mlp"),
          "train": dict(epochs=1, batch_size=16, learning_rate=1e-2, schedule="constant")}


@pytest.mark.slow  # two meshes × two steps compiled in a subprocess: ~15-30 s each on 2 loaded cores
@pytest.mark.parametrize("mixer,fused", [({"name": "attention", "num_heads": 4}, "qkv_proj"),
                                         ({"name": "mamba"}, "in_proj")], ids=["attention", "mamba"])
def test_tensor_parallel_step_matches_one_device(mixer, fused):
  """Two AdamW steps on a (data 2, fsdp 2, model 2) mesh of 8 simulated CPU devices equal the same steps
  on one device: losses within 1e-5 relative, every parameter within 2e-5 + 1e-4 relative (float32
  round-off of differently ordered reductions, amplified a little by Adam's normalisation; not the key
  bias, whose gradient is 0: below); the fused kernel is split over `model` along its channels (heads),
  never along its parts."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(_tiny_config(mixer)), fused],
                          capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  single, sharded = out["single"], out["sharded"]
  np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=1e-5)
  leaves = lambda tree: jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, list))[0]
  flat_single, flat_sharded = leaves(single["params"]), leaves(sharded["params"])
  assert [p for p, _ in flat_single] == [p for p, _ in flat_sharded] and len(flat_single) > 10
  for (path, a), (_, b) in zip(flat_single, flat_sharded):
    a, b = np.asarray(a), np.asarray(b)
    if "qkv_proj" in str(path) and "bias" in str(path):
      # The key bias adds q·b_k to every logit of a query: the softmax ignores it, its exact gradient is
      # 0, and Adam scales the round-off left in its place into ±1e-5 steps that differ between meshes.
      a, b = a[:, [0, 2]], b[:, [0, 2]]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-5, err_msg=str(path))
  # (1, d, parts, channels...) split as (runs, fsdp, whole, model, ...)
  assert sharded["spec"][:4] == ["None", "fsdp", "None", "model"], sharded["spec"]
  parts, channels = sharded["shape"][1], sharded["shape"][2]
  halves = set()
  for index in sharded["shards"]:
    assert index[1] in ([None, None], [0, parts]), index  # every part of the projection ...
    halves.add(tuple(index[2]))  # ... and half of the channels (heads)
  assert halves == {(0, channels // 2), (channels // 2, channels)}, halves


_FSDP_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import dataclasses, json
    import jax
    sys.path.insert(0, os.path.join(os.getcwd(), "experiments"))
    import bench_memory
    from zoo_jax import sharding
    from zoo_jax.configs import lm
    cfg = bench_memory.model_config("attention_125m", dict(lm.MEMORY, mixer=dict(implementation="xla")), 128,
                                    "float32")
    cfg = dataclasses.replace(cfg, n_layers=2)
    temp = {{}}
    for name, axes in (("data", dict(data=8)), ("fsdp", dict(data=1, fsdp=8))):
      compiled, _ = bench_memory.compiled_step(cfg, 32, sharding.make_mesh(**axes))
      temp[name] = compiled.memory_analysis().temp_size_in_bytes
    print(json.dumps(temp))
""")


@pytest.mark.slow  # two compiles of a 2-layer × 768 LM step for 8 simulated devices: ~1 min on 2 loaded cores
def test_fsdp_step_splits_activations_by_batch():
  """The same step over (data 8) and (data 1, fsdp 8), 4 rows per device: FSDP's temporaries per device stay
  those of data parallelism (measured 0.79×), not the 4.0× of activations split by width with the whole
  batch on every device (measured with `sharding.activation_mesh` a no-op: what XLA picked before it)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "-c", _FSDP_SCRIPT.format()], capture_output=True, text=True,
                          cwd=REPO, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  temp = json.loads(result.stdout.strip().splitlines()[-1])
  assert temp["fsdp"] < 1.5 * temp["data"], temp


def _sharding_constraints(jaxpr) -> int:
  """The number of sharding_constraint equations in a jaxpr and its sub-jaxprs (a scan body counted once)."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "sharding_constraint"
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        n += _sharding_constraints(sub) if hasattr(sub, "eqns") else 0
  return n


@pytest.mark.parametrize("scan_layers", [False, True])
def test_fsdp_splits_the_embeddings_and_every_block_output_by_batch(scan_layers):
  """Under an FSDP activation mesh the training forward pins the batch split at the embeddings and at each
  block's output (inside the scanned unit too); on any other mesh it adds no constraint. The block outputs'
  constraint changed no temporaries where measured (bench_memory --fsdp=8: attention_360m 12.46 GiB/device,
  base_conv_360m 14.11, with and without it; 4 unscanned layers 0.81): XLA had kept the embeddings' split;
  the constraint pins it rather than leaving it to propagation."""
  cfg = ModelConfig.from_config(dict(d_model=16, n_layers=3, mixer=dict(name="attention"), scan_layers=scan_layers),
                                vocab_size=32, seq_len=8)
  graphdef, params = nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(0)))
  tokens = jnp.zeros((2, 8), jnp.int32)

  def constraints(fsdp):
    mesh = AbstractMesh((1, 1, fsdp, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    def forward(p, t):
      with jax.sharding.use_abstract_mesh(mesh):
        return nnx.merge(graphdef, p)(t)
    return _sharding_constraints(jax.make_jaxpr(forward)(params, tokens).jaxpr)

  assert constraints(2) == 1 + (1 if scan_layers else cfg.n_layers)
  assert constraints(1) == 0
