"""Spec of the training forward's memory options (`zoo_jax.model`: remat, scan_layers; `tasks.token_logprobs`:
loss_chunk): the same loss and gradients as today's path within float32 round-off, and no (b, l, vocab)
array in the chunked loss's forward or backward.

Tolerance: loss rtol 1e-5; every gradient leaf within 1e-5 × the largest |gradient| of that leaf (the scan
and the chunked head sum the same terms in another order).
"""

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo_jax import tasks
from zoo_jax.model import LanguageModel, ModelConfig

V, L, D, B = 37, 8, 16, 2
MIXERS = {  # (mixer, layers)
    "attention": ({"name": "attention", "num_heads": 2}, 2),
    # kernels alternate short / long implicit: the scanned unit is 2 blocks, scanned twice
    "base_conv": ({"name": "base_conv", "kernel_size": [3, -1, 3, -1], "implicit_long_conv": True}, 4),
}
NEW = dict(remat="full", scan_layers=True, loss_chunk=3)  # 3 does not divide l - 1 = 7: a padded chunk


def make_model(mixer: str, **options) -> LanguageModel:
  cfg = ModelConfig.from_config(dict(d_model=D, n_layers=MIXERS[mixer][1], mixer=MIXERS[mixer][0],
                                     state_mixer="mlp", state_mixer_hidden_mult=2, block="prenorm", **options),
                                vocab_size=V, seq_len=L)
  return LanguageModel(cfg, rngs=nnx.Rngs(0))


@functools.cache
def todays_model(mixer: str) -> LanguageModel:
  return make_model(mixer)


def with_options(mixer: str, **options) -> LanguageModel:
  """A copy of today's model (the same parameters) with the memory options set: they change only how the
  forward runs, not what the modules hold (the tests below check the parameter tree is the same)."""
  model = nnx.merge(*nnx.split(todays_model(mixer)))
  model.cfg = dataclasses.replace(model.cfg, **options)
  model.cfg.validate()
  return model


def loss_and_grads_of(mixer: str, **options):
  return loss_and_grads(with_options(mixer, **options), tokens())


def loss_and_grads(model: LanguageModel, tokens_bl: jax.Array):
  graphdef, params = nnx.split(model, nnx.Param)
  loss_fn = lambda p: -jnp.mean(tasks.token_logprobs(nnx.merge(graphdef, p), tokens_bl))
  return jax.jit(jax.value_and_grad(loss_fn))(params)


def tokens() -> jax.Array:
  return jax.random.randint(jax.random.key(1), (B, L), 0, V)


# attention (33 s at load 9) runs with -m slow; base_conv (23 s) stays in the default suite: its scanned unit
# of 2 blocks is the harder case, and the tree test below covers attention's period of 1.
@pytest.mark.parametrize("mixer", [m if m == "base_conv" else pytest.param(m, marks=pytest.mark.slow)
                                   for m in MIXERS])
def test_scanned_rematerialised_chunked_step_equals_todays(mixer):
  loss0, grads0 = loss_and_grads_of(mixer)
  loss1, grads1 = loss_and_grads_of(mixer, **NEW)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
  for g1, g0 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0)):
    np.testing.assert_allclose(g1, g0, atol=1e-5 * float(np.abs(g0).max()))


@pytest.mark.slow
@pytest.mark.parametrize("mixer", list(MIXERS))
@pytest.mark.parametrize("options", [dict(remat="full"), dict(remat="save_matmuls"), dict(scan_layers=True),
                                     dict(loss_chunk=4), dict(loss_chunk=64)], ids=str)
def test_each_option_alone_equals_todays(mixer, options):
  loss0, grads0 = loss_and_grads_of(mixer)
  loss1, grads1 = loss_and_grads_of(mixer, **options)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
  for g1, g0 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0)):
    np.testing.assert_allclose(g1, g0, atol=1e-5 * float(np.abs(g0).max()))


def _shapes(jaxpr) -> list[tuple[int, ...]]:
  """Shapes of every value a jaxpr and its sub-jaxprs (scan, checkpoint, pjit bodies) compute."""
  out = []
  for eqn in jaxpr.eqns:
    out += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out += _shapes(inner)
  return out


@pytest.mark.parametrize("chunk,want_full_logits", [(0, True), (3, False)])
def test_chunked_loss_never_holds_the_logits_of_every_position(chunk, want_full_logits):
  model = with_options("attention", loss_chunk=chunk)
  graphdef, params = nnx.split(model, nnx.Param)
  loss_fn = lambda p: -jnp.mean(tasks.token_logprobs(nnx.merge(graphdef, p), tokens()))
  shapes = _shapes(jax.make_jaxpr(jax.value_and_grad(loss_fn))(params).jaxpr)
  # a value with a vocabulary axis and more than one chunk's positions per row
  full = [s for s in shapes if len(s) >= 2 and s[-1] == V and int(np.prod(s[:-1])) > B * max(chunk, 1)]
  assert bool(full) == want_full_logits, full


@pytest.mark.parametrize("mixer,period", [("attention", 1), ("base_conv", 2)])
def test_options_keep_the_parameter_tree_and_the_scanned_unit_is_the_layers_period(mixer, period):
  built = make_model(mixer, **NEW)
  shapes = lambda m: jax.tree.map(jnp.shape, nnx.state(m, nnx.Param).to_pure_dict())
  assert shapes(built) == shapes(todays_model(mixer))
  assert built.scan_period() == period


@pytest.mark.slow
def test_prefill_of_a_scanned_model_matches_its_training_forward():
  graphdef, params = nnx.split(make_model("base_conv", scan_layers=True, remat="full"))
  train = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
  prefill = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t, return_state=True)[0])  # the Python loop
  np.testing.assert_allclose(prefill(params, tokens()), train(params, tokens()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [dict(remat="full"), dict(scan_layers=True)], ids=str)
def test_a_sown_auxiliary_loss_is_refused_in_one_line_not_dropped(options):
  cfg = ModelConfig.from_config(dict(d_model=D, n_layers=2, mixer={"name": "sparse_attention"}, **options),
                                vocab_size=V, seq_len=L)
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))  # learned selection sows its sparsity loss
  with pytest.raises(ValueError) as err:
    model(tokens())
  assert str(err.value).startswith("model.remat / model.scan_layers cannot carry a loss a layer sows")
  assert "\n" not in str(err.value)
