"""Building blocks shared by the model and the mixers: initialisers, linear layers with logical sharding
axes, short and long (FFT) causal convolutions, implicit filters, and the state mixers (MLP, GLU).

Dimension legend: b batch, l sequence length, d model width, c channels, e positional-feature width.

Initialisation follows Zoology's `_init_weights`: every linear and embedding weight ~ N(0, 0.02), biases 0,
and the weights Zoology's name test picks (`out_proj`, `fc2`) ~ N(0, 0.02 / sqrt(2 * n_layers)): an output
projection, except in `GLU`, whose `fc2` is the gate. Depthwise convolutions keep PyTorch's default
`Conv1d` init, U(-1/sqrt(k), 1/sqrt(k)) for weight and bias, as Zoology does.

Line numbers cited from HazyResearch/zoology: `zoology/mixers/mlp.py` at 7b4aefc, `zoology/model.py` at
0cd64f8.
"""

import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from zoo_jax.ops import long_conv, short_conv

INIT_STD = 0.02

# The `conv_implementation` hyperparameter of the convolution mixers: which kernel path runs the long (and
# short) convolutions. None: the fastest measured for the backend (`ops.*.FASTEST`).
CONV_IMPLEMENTATIONS = long_conv.IMPLEMENTATIONS


def validate_conv_implementation(value: str | None, field: str) -> None:
  if value is not None and value not in CONV_IMPLEMENTATIONS:
    raise ValueError(f"{field}.conv_implementation must be None or one of {list(CONV_IMPLEMENTATIONS)}, "
                     f"got {value!r}")


def short_conv_implementation(implementation: str | None) -> str | None:
  """The short-conv path for a mixer's `conv_implementation`: the same name where the short conv has that
  path; 'monarch' (an FFT path, meaningless for k taps) runs the short conv by 'xla'."""
  return implementation if implementation in (None, *short_conv.IMPLEMENTATIONS) else "xla"


def normal(std: float = INIT_STD):
  return jax.nn.initializers.normal(stddev=std)


def out_proj_std(n_layers: int) -> float:
  return INIT_STD / math.sqrt(2 * n_layers)


def logical(init, axes: tuple[str | None, ...]):
  """Tags an initialiser with logical axis names. Sharding is applied by the trainer through
  `zoo_jax.sharding.LOGICAL_RULES`, not eagerly at creation (Flax's eager sharding would need a mesh
  context wherever a model is built, in tests and notebooks too)."""
  return nnx.with_partitioning(init, axes, eager_sharding=False)


def linear(d_in: int, d_out: int, *, axes: tuple[str | None, str | None], rngs: nnx.Rngs,
           std: float = INIT_STD, use_bias: bool = True, dtype: Any = jnp.float32) -> nnx.Linear:
  """A linear layer whose kernel carries logical sharding axes (see `zoo_jax.sharding.LOGICAL_RULES`)."""
  return nnx.Linear(
      d_in, d_out, use_bias=use_bias, dtype=dtype, rngs=rngs,
      kernel_init=logical(normal(std), axes),
      bias_init=logical(jax.nn.initializers.zeros, (axes[1],)))


class FusedLinear(nnx.Module):
  """x W + b for a fused projection whose output is split later (q / k / v, the two halves of a gate), with
  the split kept as a dimension of its own: kernel (d_in, *out_shape), e.g. (embed, 3, heads, head_dim) as
  in MaxText, output (..., *out_shape).

  The split dimension's logical axis is None (never sharded), so a `model` shard of the kernel holds a slice
  of every part (heads h0..h1 of q, k and v) and never all of q on one device and all of v on another, as
  a (d_in, 3·d) kernel split column-wise over `model` would. The function and its initialisation are
  `linear(d_in, prod(out_shape))`'s: the kernel is drawn as (d_in, prod(out_shape)) ~ N(0, std) (fan-in
  d_in) from the same key and reshaped, the bias is 0, and the keys are taken in `nnx.Linear`'s order
  (kernel, then bias), so a seed gives the same values as the 2-D layout. `kernel.reshape(d_in, -1)` is
  that layout's kernel.
  """

  def __init__(self, d_in: int, out_shape: tuple[int, ...], *, axes: tuple[str | None, ...],
               rngs: nnx.Rngs, std: float = INIT_STD, use_bias: bool = True, dtype: Any = jnp.float32):
    if len(axes) != 1 + len(out_shape):
      raise ValueError(f"FusedLinear: {len(axes)} axes for a kernel of rank {1 + len(out_shape)}")
    out_shape = tuple(out_shape)

    def kernel_init(key, shape, dtype=jnp.float32):
      return normal(std)(key, (d_in, math.prod(out_shape)), dtype).reshape(shape)

    self.kernel = nnx.Param(logical(kernel_init, axes)(rngs.params(), (d_in, *out_shape)))
    self.bias = (nnx.Param(logical(jax.nn.initializers.zeros, axes[1:])(rngs.params(), out_shape))
                 if use_bias else nnx.data(None))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    bias = self.bias[...] if self.bias is not None else None
    x, kernel, bias = nnx.nn.dtypes.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y if bias is None else y + bias


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout, stateless: each element zeroed with probability `rate` (a Bernoulli mask drawn from
  `key`), the rest scaled by 1 / (1 − rate); `x` itself when `key` is None or the rate is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def _torch_conv_init(fan_in: int):
  """PyTorch's default Conv1d init for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class ShortConvolution(nnx.Module):
  """Depthwise causal convolution of width k: y[t] = act(b + sum_{j<k} w[j] * u[t-(k-1)+j]), by
  `ops.short_conv` (act: None, the default, or 'silu' fused into the kernel)."""

  def __init__(self, d_model: int, kernel_size: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
               activation: str | None = None, implementation: str | None = None):
    init = _torch_conv_init(kernel_size)
    # w_kc[j] multiplies u[t - (k-1) + j], i.e. the last tap looks at the current token.
    self.w_kc = nnx.Param(init(rngs.params(), (kernel_size, d_model)))
    self.b_c = nnx.Param(init(rngs.params(), (d_model,)))
    self.kernel_size = kernel_size
    self.dtype = dtype
    self.activation = activation
    self.implementation = short_conv_implementation(implementation)

  def __call__(self, u_bld: jax.Array) -> jax.Array:
    return short_conv.short_conv(u_bld, self.w_kc[...].astype(self.dtype), self.b_c[...].astype(self.dtype),
                                 activation=self.activation, implementation=self.implementation)

  def init_state(self, batch_size: int) -> dict[str, jax.Array]:
    """The last k-1 inputs, (b, k-1, d), zeros before the sequence starts."""
    return dict(window=jnp.zeros((batch_size, self.kernel_size - 1, self.w_kc.shape[1]), jnp.float32))

  def step(self, state: dict[str, jax.Array], u_bd: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    window_bkd = jnp.concatenate([state["window"], u_bd[:, None].astype(jnp.float32)], axis=1)
    y_bd = jnp.einsum("bkd,kd->bd", window_bkd, self.w_kc[...].astype(jnp.float32)) + self.b_c[...]
    if self.activation == "silu":
      y_bd = jax.nn.silu(y_bd)
    return dict(window=window_bkd[:, 1:]), y_bd.astype(self.dtype)


def long_conv_init_state(batch_size: int, seq_len: int, d_model: int) -> dict[str, jax.Array]:
  """Recurrent state of a long convolution: the whole input history (b, L, d) and the position."""
  return dict(history=jnp.zeros((batch_size, seq_len, d_model), jnp.float32),
              t=jnp.zeros((batch_size,), jnp.int32))


def long_conv_step(state: dict[str, jax.Array], u_bd: jax.Array, h_lc: jax.Array):
  """One token of y[t] = sum_{s<=t} h[t-s] u[s] + u[t]: O(L·d) per token, the cost of a long filter's state."""
  t_b = state["t"]
  history_bld = jax.vmap(lambda hist, t, u: hist.at[t].set(u))(state["history"], t_b,
                                                              u_bd.astype(jnp.float32))
  lags_bl = t_b[:, None] - jnp.arange(h_lc.shape[0])[None]  # h index for each stored position
  h_bld = jnp.where((lags_bl >= 0)[..., None], h_lc.astype(jnp.float32)[jnp.maximum(lags_bl, 0)], 0.0)
  y_bd = (h_bld * history_bld).sum(axis=1) + u_bd.astype(jnp.float32)
  return dict(history=history_bld, t=t_b + 1), y_bd.astype(u_bd.dtype)


class LongConvolution(nnx.Module):
  """Explicit long convolution: one free filter of length L per channel, applied by FFT, plus u.

  As in Zoology's `LongConvolution` the filter is initialised N(0, 1) and the output adds the input
  (`fft_conv` returns `y + u`).
  """

  def __init__(self, d_model: int, seq_len: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
               implementation: str | None = None):
    self.h_lc = nnx.Param(jax.random.normal(rngs.params(), (seq_len, d_model)))
    self.dtype = dtype
    self.implementation = implementation

  def filter(self, length: int) -> jax.Array:
    return self.h_lc[:length]

  def __call__(self, u_bld: jax.Array) -> jax.Array:
    y_bld = long_conv.causal_conv(u_bld, self.filter(u_bld.shape[1]), implementation=self.implementation)
    return (y_bld + u_bld).astype(self.dtype)

  def init_state(self, batch_size: int) -> dict[str, jax.Array]:
    return long_conv_init_state(batch_size, *self.h_lc.shape)

  def step(self, state, u_bd):
    state, y_bd = long_conv_step(state, u_bd, self.h_lc[...])
    return state, y_bd.astype(self.dtype)


def positional_features(seq_len: int, emb_dim: int) -> jax.Array:
  """Zoology's `PositionalEmbedding` for implicit filters: [t/(L-1), Re z, Im z], z = exp(-i f 2πt/L)."""
  if emb_dim < 3 or emb_dim % 2 == 0:
    raise ValueError(f"implicit filter emb_dim must be odd and >= 3, got {emb_dim}")
  bands = (emb_dim - 1) // 2
  t_l1 = jnp.linspace(0.0, 1.0, seq_len)[:, None]
  w_l1 = 2 * math.pi * jnp.arange(seq_len, dtype=jnp.float32)[:, None] / seq_len
  f_1e = jnp.linspace(1e-4, bands - 1, bands)[None, :]
  return jnp.concatenate([t_l1, jnp.cos(f_1e * w_l1), -jnp.sin(f_1e * w_l1)], axis=-1)


class ImplicitLongConvolution(nnx.Module):
  """Long convolution whose filter is an MLP (Linear, ReLU, Linear) of positional features, applied by FFT.

  Matches Zoology's `ImplicitLongConvolution` (d_emb=3, d_hidden=16) and adds the input like `fft_conv`.
  """

  def __init__(self, d_model: int, seq_len: int, *, d_emb: int = 3, d_hidden: int = 16,
               rngs: nnx.Rngs, dtype: Any = jnp.float32, implementation: str | None = None):
    self.seq_len = seq_len
    self.d_emb = d_emb
    self.implementation = implementation
    self.fc1 = linear(d_emb, d_hidden, axes=(None, None), rngs=rngs)
    self.fc2 = linear(d_hidden, d_model, axes=(None, None), rngs=rngs)
    self.dtype = dtype

  def filter(self, length: int) -> jax.Array:
    z_le = positional_features(self.seq_len, self.d_emb)[:length]
    return self.fc2(jax.nn.relu(self.fc1(z_le)))

  def __call__(self, u_bld: jax.Array) -> jax.Array:
    y_bld = long_conv.causal_conv(u_bld, self.filter(u_bld.shape[1]), implementation=self.implementation)
    return (y_bld + u_bld).astype(self.dtype)

  def init_state(self, batch_size: int) -> dict[str, jax.Array]:
    return long_conv_init_state(batch_size, self.seq_len, self.fc2.out_features)

  def step(self, state, u_bd):
    state, y_bd = long_conv_step(state, u_bd, self.filter(self.seq_len))
    return state, y_bd.astype(self.dtype)


class MLP(nnx.Module):
  """State mixer fc2(gelu(fc1(x))) with the exact (erf) GELU, Zoology's `MLP`.

  Zoology (`zoology/mixers/mlp.py`, lines 4-25): `fc1 = nn.Linear(d, d * hidden_mult)`, `activation =
  F.gelu` (PyTorch's default `approximate='none'`, the erf form), `fc2 = nn.Linear(d * hidden_mult, d)`.
  `_init_weights` (`zoology/model.py`, line 88) rescales `fc2.weight`, the output projection, to
  N(0, 0.02 / sqrt(2 n_layers)).
  """

  def __init__(self, d_model: int, hidden_mult: int, *, n_layers: int, rngs: nnx.Rngs,
               dtype: Any = jnp.float32):
    hidden = hidden_mult * d_model
    self.fc1 = linear(d_model, hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.fc2 = linear(hidden, d_model, axes=("mlp", "embed"), rngs=rngs, dtype=dtype,
                      std=out_proj_std(n_layers))

  def __call__(self, x_bld: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x_bld), approximate=False))


class GLU(nnx.Module):
  """State mixer fc3(fc1(x) * gelu(fc2(x))) with the exact (erf) GELU, Zoology's `GLU`.

  Zoology (`zoology/mixers/mlp.py`, lines 28-50): `fc1`, `fc2 = nn.Linear(d, d * hidden_mult)`, `fc3 =
  nn.Linear(d * hidden_mult, d)`, `forward: fc3(fc1(x) * F.gelu(fc2(x)))` (line 48). Its init rescale is
  by parameter name (`zoology/model.py`, `_init_weights`, line 88: `"out_proj.weight" in name or
  "fc2.weight" in name`), so it reaches the gate's `fc2`, N(0, 0.02 / sqrt(2 n_layers)), while the output
  projection `fc3` keeps N(0, 0.02). Both are reproduced here as Zoology has them.
  """

  def __init__(self, d_model: int, hidden_mult: int, *, n_layers: int, rngs: nnx.Rngs,
               dtype: Any = jnp.float32):
    hidden = hidden_mult * d_model
    self.fc1 = linear(d_model, hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.fc2 = linear(d_model, hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dtype,
                      std=out_proj_std(n_layers))
    self.fc3 = linear(hidden, d_model, axes=("mlp", "embed"), rngs=rngs, dtype=dtype)

  def __call__(self, x_bld: jax.Array) -> jax.Array:
    return self.fc3(self.fc1(x_bld) * jax.nn.gelu(self.fc2(x_bld), approximate=False))
