"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs"): the SSD layer, with `mamba_ssm`'s `Mamba2` structure.

    z, xBC, δ = split(u W_in)                   widths e, e + 2·g·n, H   (e = expand·d, H = e / p heads)
    x, B, C = split(SiLU(causal depthwise conv_{d_conv}(xBC)))     widths e, g·n, g·n
    Δ = softplus(δ + b_dt)                        (b, l, H): one step size per head and token
    A = −exp(A_log)                               (H,): a scalar times the identity per head (Section 5)
    h_t = exp(Δ_t A) h_{t−1} + B_t (Δ_t x_t)ᵀ    per head, (n × p); B, C shared by the H/g heads of a group
    y_t = h_tᵀ C_t + D x_t                        (Section 3's selective SSM; D one scalar per head)
    out = RMSNorm_g(y ⊙ SiLU(z)) W_out           gated RMSNorm over each group's e/g channels (Section 7)

Dimension legend: b batch, l length, d model width, e inner width, h / H heads, p head width (head_dim),
n state width (d_state), g groups of B, C (ngroups), k conv width.

The parallel form is the chunked state-space-dual algorithm (Section 6): inside a chunk of `chunk_size`
tokens the quadratic (attention-like) form (C Bᵀ ⊙ L) (Δ x) with the 1-semiseparable mask
L_ts = exp(Σ_{s<u<=t} Δ_u A) (the "segsum"), across chunks the states passed by a `lax.scan`
(`ops.chunked_gla.chunked`, which states the algorithm and its numerics: float32, every exponent <= 0).
`step` is the recurrence above, one token at a time. A length that the chunk does not divide is padded.

Hyperparameters (`mamba_ssm.modules.mamba2.Mamba2`'s defaults, which Zoology's copy keeps; Zoology's
sweep sets only d_state ∈ {8, 16, 24}): `d_state` = 128, `d_conv` = 4, `expand` = 2, `head_dim` = 64
(`headdim`), `ngroups` = 1, `A_init_range` = (1, 16), `dt_min` = 1e-3, `dt_max` = 0.1,
`dt_init_floor` = 1e-4, `bias` = False, `norm_before_gate` = False, `chunk_size` = 256.

Initialisation (mamba_ssm): A = U(A_init_range) per head, A_log = log A; b_dt = softplus⁻¹(Δ₀), Δ₀
log-uniform in [dt_min, dt_max], floored at dt_init_floor; D = 1; the norm's weight 1; the conv keeps
PyTorch's Conv1d init (`layers.ShortConvolution`, with bias, as `conv_bias=True`). in_proj ~ N(0, 0.02)
and out_proj ~ N(0, 0.02/sqrt(2·n_layers)), as every zoo_jax mixer (Zoology's `_init_weights`).

Differences from `mamba_ssm` (and Zoology's copy of it):
- head_dim is clipped to the inner width: a head is min(head_dim, e) wide, so the default builds at the
  tests' d = 16 (e = 32: one head of 32) while every width of Zoology's sweep (d >= 64, e >= 128) gets
  mamba_ssm's heads of 64. mamba_ssm asserts e % head_dim == 0 instead; here a head_dim < e that does not
  divide e is a one-line ValueError, as is an ngroups that does not divide the heads.
- The SSD is `lax.scan` over chunks and einsums inside them, in float32 at the highest matmul precision,
  instead of the Triton `mamba_chunk_scan_combined`; Δ and the decays are float32 whatever the compute
  dtype; the projections and the conv run in the compute dtype.
- Not options: `d_ssm` (a gated-MLP part beside the SSM), `D_has_hdim`, `rmsnorm=False`, `dt_limit`,
  `conv_init`, `conv_bias=False`, and the kernel / sharding switches (`use_mem_eff_path`,
  `process_group`, `sequence_parallel`).
- State size: Zoology's `Mamba2.state_size` reports 2·d·d_state (the SSM state at expand 2); here the
  conv window, which the recurrent form must also keep, is counted too.

Zoology trains Mamba-2 in its `Mamba2Block` (x + mixer(RMSNorm(x)), no state mixer): in zoo_jax
`model.block = 'mamba'`.

State: the SSM state H·n·p = e·n and the conv window (e + 2·g·n)·(d_conv − 1) elements per example.
`__call__(u, state=..., return_state=True)` continues from such a state (prefill → decode): the conv
window (the last inputs x | B | C before the conv) is prepended to the conv's input, the chunked SSD
starts from the SSM state (`ops.chunked_gla.chunked`'s initial state), and the state after u is its
final chunk state and the last d_conv − 1 conv inputs.

Sharding: the fused in_proj (z | x | B | C | δ) kernel is replicated over the mesh's `model` axis (logical
axes (embed, None)): its parts have unequal widths and the short conv runs over x | B | C before their
split, so a split of its columns would cut across the parts (`layers.FusedLinear` is the layout of the
mixers whose parts split evenly).
"""

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from zoo_jax import layers
from zoo_jax.mixers import _filters, registry
from zoo_jax.ops import chunked_gla
from zoo_jax.mixers.mamba import _dt_bias_init  # softplus⁻¹ of log-uniform Δ₀, as mamba_ssm (both Mambas)

NORM_EPS = 1e-5  # mamba_ssm's RMSNormGated


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
  d_state: int = 128
  d_conv: int = 4
  expand: int = 2
  head_dim: int = 64
  ngroups: int = 1
  A_init_range: tuple[float, ...] = (1.0, 16.0)
  dt_min: float = 1e-3
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  bias: bool = False
  norm_before_gate: bool = False
  chunk_size: int = 256

  def validate(self, field: str) -> None:
    for name in ("d_state", "d_conv", "expand", "head_dim", "ngroups", "chunk_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{field}.{name} must be >= 1, got {getattr(self, name)}")
    if len(self.A_init_range) != 2 or not 0 < self.A_init_range[0] <= self.A_init_range[1]:
      raise ValueError(f"{field}.A_init_range must be [low, high] with 0 < low <= high, "
                       f"got {list(self.A_init_range)}")
    if self.dt_max <= 0:
      raise ValueError(f"{field}.dt_max must be > 0, got {self.dt_max}")
    if not 0 < self.dt_min <= self.dt_max:
      raise ValueError(f"{field}.dt_min must be in (0, dt_max = {self.dt_max}], got {self.dt_min}")
    if self.dt_init_floor < 0:
      raise ValueError(f"{field}.dt_init_floor must be >= 0, got {self.dt_init_floor}")

  def inner_width(self, d_model: int) -> int:
    return self.expand * d_model

  def check_shapes(self, field: str, *, d_model: int, seq_len: int, layer_idx: int) -> None:
    self.heads(d_model, field)

  def heads(self, d_model: int, field: str = "model.mixer") -> tuple[int, int]:
    """(H, p): the number of heads and their width; a one-line ValueError if they do not fit."""
    e = self.inner_width(d_model)
    p = min(self.head_dim, e)
    if e % p:
      raise ValueError(f"{field}.head_dim must divide expand·d_model = {e} (or be >= it), got {self.head_dim}")
    if (e // p) % self.ngroups:
      raise ValueError(f"{field}.ngroups must divide the number of heads expand·d_model / head_dim = "
                       f"{e // p}, got {self.ngroups}")
    return e // p, p


def _a_log_init(cfg: Mamba2Config):
  low, high = cfg.A_init_range
  return lambda key, shape, dtype=jnp.float32: jnp.log(jax.random.uniform(key, shape, dtype, low, high))


@registry.register("mamba2", hparams=Mamba2Config,
                   state_size_formula="e·d_state + (e + 2·ngroups·d_state)·(d_conv-1), e = expand·d "
                                      "(SSM state + conv window)")
class Mamba2(nnx.Module):

  def __init__(self, cfg: Mamba2Config, *, d_model: int, seq_len: int, layer_idx: int, n_layers: int,
               dtype: Any, rngs: nnx.Rngs):
    e, n, g = cfg.inner_width(d_model), cfg.d_state, cfg.ngroups
    self.num_heads, self.head_dim = cfg.heads(d_model)
    self.d_state, self.ngroups, self.chunk_size = n, g, cfg.chunk_size
    self.norm_before_gate, self.dtype = cfg.norm_before_gate, dtype
    # z, x, B, C, δ: unequal widths, so replicated over `model` (logical None): a column split would cut
    # across them.
    self.in_proj = layers.linear(d_model, 2 * e + 2 * g * n + self.num_heads, axes=("embed", None),
                                 rngs=rngs, dtype=dtype, use_bias=cfg.bias)
    self.conv = layers.ShortConvolution(e + 2 * g * n, cfg.d_conv, rngs=rngs, dtype=dtype)
    per_head = lambda init: nnx.Param(layers.logical(init, ("heads",))(rngs.params(), (self.num_heads,)))
    self.dt_bias = per_head(_dt_bias_init(cfg))
    self.A_log = per_head(_a_log_init(cfg))
    self.D = per_head(jax.nn.initializers.ones)
    self.norm = nnx.RMSNorm(e, epsilon=NORM_EPS, dtype=jnp.float32, feature_axes=(-2, -1), rngs=rngs,
                            scale_init=layers.logical(jax.nn.initializers.ones, ("mlp",)))
    self.out_proj = layers.linear(e, d_model, axes=("mlp", "embed"), rngs=rngs, dtype=dtype,
                                  std=layers.out_proj_std(n_layers), use_bias=cfg.bias)

  @staticmethod
  def state_size(cfg: Mamba2Config, d_model: int, seq_len: int, layer_idx: int) -> int:
    heads, head_dim = cfg.heads(d_model)
    e = heads * head_dim
    return e * cfg.d_state + (e + 2 * cfg.ngroups * cfg.d_state) * (cfg.d_conv - 1)

  def _split(self, zxbcdt):
    e = self.num_heads * self.head_dim
    return jnp.split(zxbcdt, [e, 2 * e + 2 * self.ngroups * self.d_state], axis=-1)  # z, xBC, δ

  def _ssd_inputs(self, xbc_conv, delta):
    """(q = C, k = B, v = Δ x, log-decay Δ A, x) per head, float32, from the conv's output and δ."""
    lead, e, gn = xbc_conv.shape[:-1], self.num_heads * self.head_dim, self.ngroups * self.d_state
    x, b, c = jnp.split(jax.nn.silu(xbc_conv).astype(jnp.float32), [e, e + gn], axis=-1)
    x = x.reshape(*lead, self.num_heads, self.head_dim)
    heads_per_group = self.num_heads // self.ngroups  # head h reads group h // (H / g), as mamba_ssm
    b, c = (jnp.repeat(t.reshape(*lead, self.ngroups, self.d_state), heads_per_group, axis=-2) for t in (b, c))
    dt = jax.nn.softplus(delta.astype(jnp.float32) + self.dt_bias[...])
    log_decay = (dt * -jnp.exp(self.A_log[...]))[..., None]
    return c, b, x * dt[..., None], log_decay, x

  def _output(self, y_heads, x_heads, z):
    """y + D x, the gated RMSNorm over each group, out_proj."""
    y = y_heads + self.D[...][:, None] * x_heads
    y = y.reshape(*y.shape[:-2], self.ngroups, -1)
    gate = jax.nn.silu(z.astype(jnp.float32)).reshape(y.shape)
    y = self.norm(y) * gate if self.norm_before_gate else self.norm(y * gate)
    return self.out_proj(y.reshape(*y.shape[:-2], -1).astype(self.dtype))

  def __call__(self, u_bld: jax.Array, state: dict[str, Any] | None = None,
               return_state: bool = False) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
    """The chunked SSD over u; from `state` (`init_state`'s pytree) it continues after the tokens the state
    has seen: the conv window is prepended to the conv's input and the chunked scan starts from the SSM
    state. With `return_state`, also the state after u: the last d_conv − 1 conv inputs and the final
    chunk state."""
    state = {} if state is None else state  # None: the sequence starts here (h = 0, zero conv inputs before it)
    z, xbc, delta = self._split(self.in_proj(u_bld))
    xbc_conv, conv_state = _filters.short_conv_continued(self.conv, state.get("conv"), xbc)
    q, k, v, log_decay, x = self._ssd_inputs(xbc_conv, delta)
    result = chunked_gla.chunked(q, k, v, log_decay, self.chunk_size, initial_state_bhkv=state.get("ssm"),
                                 output_final_state=return_state)
    if not return_state:
      return self._output(result, x, z).astype(u_bld.dtype)
    y_blhp, ssm_state = result
    return self._output(y_blhp, x, z).astype(u_bld.dtype), dict(conv=conv_state, ssm=ssm_state)

  def init_state(self, batch_size: int) -> dict[str, Any]:
    """The conv window (b, d_conv − 1, e + 2·g·n) and the SSM state per head (b, H, n, p), zeros."""
    return dict(conv=self.conv.init_state(batch_size),
                ssm=jnp.zeros((batch_size, self.num_heads, self.d_state, self.head_dim), jnp.float32))

  def step(self, state: dict[str, Any], u_bd: jax.Array) -> tuple[dict[str, Any], jax.Array]:
    z, xbc, delta = self._split(self.in_proj(u_bd))
    conv_state, xbc_conv = self.conv.step(state["conv"], xbc)
    q, k, v, log_decay, x = self._ssd_inputs(xbc_conv, delta)
    ssm_state, y_bhp = chunked_gla.recurrent_step(state["ssm"], q, k, v, log_decay)
    return dict(conv=conv_state, ssm=ssm_state), self._output(y_bhp, x, z).astype(u_bd.dtype)
