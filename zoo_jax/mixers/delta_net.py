"""DeltaNet (Yang, Wang, Zhang, Shen & Kim 2024, "Parallelizing Linear Transformers with the Delta Rule
over Sequence Length"): linear attention whose state is updated by the delta rule.

Dimension legend: b batch, l length, d model width, h heads, k key width per head (d/H), v value width
per head (expand_v·d/H), c conv channels (2d + expand_v·d).

Per head (the paper's eq. 1, with the state S as a k × v matrix):

    q, k, v = SiLU(causal depthwise conv_{conv_size}(x W_q | x W_k | x W_v))    (flash-linear-attention)
    q ← q / ‖q‖ / sqrt(k),  k ← k / ‖k‖,  β = sigmoid(x W_β) (one per head; 2·sigmoid with
    allow_neg_eigval, Grazzi et al. 2024)
    S_t = S_{t−1} + β_t k_t (v_t − S_{t−1}ᵀ k_t)ᵀ = (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ
    o_t = S_tᵀ q_t
    out = (RMSNorm_v(o) [⊙ SiLU(x W_g) with use_gate]) W_o       (RMSNorm per head, weight shared)

The recurrence is `ops.delta_rule`'s generalised rule with w = 1, a = −k, b = β k and the write (β k) vᵀ; the
training form is its chunked WY / UT form (Section 3 of the paper: `lax.scan` over chunks of `chunk_size`
tokens, matmuls and one triangular solve inside a chunk, all in float32); `form = 'recurrent'` runs the
token-by-token recurrence instead (the reference; `step` is one token of it).

Hyperparameters (flash-linear-attention's `DeltaNet` layer, which Zoology wraps; defaults there in
brackets): `num_heads` = 2 [4; Zoology's configs set 2], `expand_v` = 1 [1.0; integer here], key width
d (expand_k = 1), `conv_size` = 4, `use_gate` = False, `allow_neg_eigval` = False, `norm_eps` = 1e-5,
`chunk_size` = 64 (clipped to L), `form` = 'chunked'.

Differences from flash-linear-attention / Zoology:
- q, k, v and β (and the output gate) come from one fused bias-free projection, and the three short
  convolutions are one depthwise conv over the concatenated channels (the same function and the same
  init distribution as separate layers); the conv has a bias (zoo_jax's `ShortConvolution`; fla's
  `conv_bias` defaults to False) and runs in float32 whatever the compute dtype: its bias (U(±1/2))
  dwarfs the projected signal at init, and bfloat16 rounding of their sum cost ~2% of the output.
- Zoology casts q, k, v to bfloat16 for the Triton kernels; here the delta rule runs in float32 whatever
  the compute dtype (the issue asks for float32 accumulation).
- Only fla's default feature path (SiLU then L2 normalisation) is offered, not its `qk_activation` /
  `qk_norm` alternatives.
- Initialisation is zoo_jax's (N(0, 0.02), out_proj N(0, 0.02/sqrt(2·n_layers))), which is what
  Zoology's `_init_weights` leaves on fla's linear layers too.

State: the delta-rule state, H·k·v = expand_v·d²/H elements, plus the conv windows of q, k and v,
(conv_size − 1)·(2 + expand_v)·d elements, per example per layer (Zoology's `state_size` counts only the
first; the recurrent form cannot drop the second). `__call__(x, state=..., return_state=True)` continues
from such a state (prefill → decode): the conv window is prepended to the conv's input, the chunked rule
starts from S, and the state after x is the last conv_size − 1 conv inputs and the final chunk state.

Sharding: the fused in_proj kernel is replicated over the mesh's `model` axis (logical
axes (embed, None)): its parts have unequal widths and the short conv runs over them before the split,
so a split of its columns would cut across q, k and v (`layers.FusedLinear` is the layout of the
mixers whose parts split evenly).
"""

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from zoo_jax import layers
from zoo_jax.mixers import _filters
from zoo_jax.mixers import registry
from zoo_jax.ops import delta_rule


@dataclasses.dataclass(frozen=True)
class DeltaNetConfig:
  num_heads: int = 2
  expand_v: int = 1
  conv_size: int = 4
  use_gate: bool = False
  allow_neg_eigval: bool = False
  norm_eps: float = 1e-5
  chunk_size: int = 64
  form: str = "chunked"

  def validate(self, field: str) -> None:
    for name in ("num_heads", "expand_v", "conv_size", "chunk_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{field}.{name} must be an integer >= 1, got {getattr(self, name)}")
    if not self.norm_eps > 0:
      raise ValueError(f"{field}.norm_eps must be > 0, got {self.norm_eps}")
    if self.form not in delta_rule.FORMS:
      raise ValueError(f"{field}.form must be one of {list(delta_rule.FORMS)}, got {self.form!r}")

  def check_shapes(self, field: str, *, d_model: int, seq_len: int, layer_idx: int) -> None:
    registry.check_heads(field, self.num_heads, d_model)  # keys are d_model wide, split over the heads


def check_heads_divide(num_heads: int, d_model: int) -> None:
  if d_model % num_heads:
    raise ValueError(f"model.mixer.num_heads must divide model.d_model ({d_model}), got {num_heads}")


@registry.register("delta_net", hparams=DeltaNetConfig,
                   state_size_formula="e·d²/H + (conv_size−1)·(2+e)·d, e = expand_v "
                                      "(H delta-rule states (d/H)×(e·d/H) + q/k/v conv windows)")
class DeltaNet(nnx.Module):
  """DeltaNet; `GatedDeltaNet` reuses it with a per-head decay (`HAS_DECAY`) and its own defaults."""

  # A per-head decay α_t = exp(log_decay(logits_t)) from the projection (Gated DeltaNet defines
  # `log_decay`); DeltaNet's α is 1.
  HAS_DECAY = False

  def __init__(self, cfg: DeltaNetConfig, *, d_model: int, seq_len: int, layer_idx: int, n_layers: int,
               dtype: Any, rngs: nnx.Rngs):
    check_heads_divide(cfg.num_heads, d_model)
    h = cfg.num_heads
    self.num_heads, self.chunk_size, self.form, self.dtype = h, cfg.chunk_size, cfg.form, dtype
    self.use_gate = cfg.use_gate
    self.beta_scale = 2.0 if cfg.allow_neg_eigval else 1.0
    self.key_width, self.value_width = d_model, cfg.expand_v * d_model
    conv_width = 2 * self.key_width + self.value_width
    # [q | k | v | gate (use_gate) | β logits | decay logits (HAS_DECAY)]
    proj_width = (conv_width + self.value_width * cfg.use_gate + h * (1 + self.HAS_DECAY))
    # Replicated over `model` (logical None): its parts have unequal widths and the short conv runs over
    # the fused q, k, v channels, so a column split would cut across them.
    self.in_proj = layers.linear(d_model, proj_width, axes=("embed", None), rngs=rngs, dtype=dtype,
                                 use_bias=False)
    # The conv runs in float32: its bias (U(±1/2) at conv_size 4) dwarfs the projected signal (~0.1), and
    # bfloat16 rounding of their sum cost ~2% of the output (measured), above the shared bf16 bound.
    # SiLU is fused into it (flash-linear-attention's ShortConvolution(activation='silu') on q, k, v).
    self.conv = layers.ShortConvolution(conv_width, cfg.conv_size, rngs=rngs, dtype=jnp.float32,
                                        activation="silu")
    self.norm = nnx.RMSNorm(self.value_width // h, epsilon=cfg.norm_eps, dtype=jnp.float32, rngs=rngs)
    self.out_proj = layers.linear(self.value_width, d_model, axes=("heads", "embed"), rngs=rngs,
                                  dtype=dtype, std=layers.out_proj_std(n_layers), use_bias=False)

  @staticmethod
  def state_size(cfg: DeltaNetConfig, d_model: int, seq_len: int, layer_idx: int) -> int:
    key, value = d_model, cfg.expand_v * d_model
    return key * value // cfg.num_heads + (cfg.conv_size - 1) * (2 * key + value)

  def _rule_inputs(self, qkv_blc: jax.Array, rest_blr: jax.Array):
    """The generalised rule's (q, write key, v, log w, a, b) per head from the conv's float32 output
    SiLU(conv(q | k | v)), and the output gate's logits."""
    b, l, _ = qkv_blc.shape
    h, kw, vw = self.num_heads, self.key_width, self.value_width
    q, k, v = (qkv_blc[..., :kw], qkv_blc[..., kw:2 * kw], qkv_blc[..., 2 * kw:])
    q = delta_rule.l2_normalize(q.reshape(b, l, h, -1)) * (kw // h) ** -0.5
    k = delta_rule.l2_normalize(k.reshape(b, l, h, -1))
    v = v.reshape(b, l, h, -1)
    gate_blv = rest_blr[..., :vw] if self.use_gate else None
    logits = rest_blr[..., vw * self.use_gate:].astype(jnp.float32)
    beta_blh1 = self.beta_scale * jax.nn.sigmoid(logits[..., :h])[..., None]
    if self.HAS_DECAY:  # the subclass's log α per head and token
      log_w_blh1 = self.log_decay(logits[..., h:])[..., None]
    else:
      log_w_blh1 = jnp.zeros_like(beta_blh1)
    # α(I − β k kᵀ) = diag(α) + (α β k)(−k)ᵀ: a = −k, b = α β k.
    rule = (q, beta_blh1 * k, v, log_w_blh1, -k, jnp.exp(log_w_blh1) * beta_blh1 * k)
    return rule, gate_blv

  def _output(self, o_blhv: jax.Array, gate_blv: jax.Array | None) -> jax.Array:
    b, l = o_blhv.shape[:2]
    o_blhv = self.norm(o_blhv)
    if gate_blv is not None:
      o_blhv = o_blhv * jax.nn.silu(gate_blv.astype(jnp.float32)).reshape(o_blhv.shape)
    return self.out_proj(o_blhv.reshape(b, l, -1).astype(self.dtype))

  def _split(self, z: jax.Array):
    conv_width = 2 * self.key_width + self.value_width
    return z[..., :conv_width], z[..., conv_width:]

  def __call__(self, x_bld: jax.Array, state: dict[str, Any] | None = None,
               return_state: bool = False) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
    """The chunked (or recurrent) form over x; from `state` (`init_state`'s pytree) it continues after the
    tokens the state has seen: the conv window is prepended to the conv's input and the delta rule starts
    from S. With `return_state`, also the state after x: the last conv_size−1 conv inputs and the chunked
    scan's final S."""
    conv_in, rest = self._split(self.in_proj(x_bld))
    conv_in = conv_in.astype(jnp.float32)
    if state is None and not return_state:  # training: no state in or out
      qkv_blc, conv_state = self.conv(conv_in), None
    else:
      qkv_blc, conv_state = _filters.short_conv_continued(self.conv, None if state is None else state["conv"], conv_in)
    s0 = None if state is None else state["s"]
    rule, gate = self._rule_inputs(qkv_blc, rest)
    result = delta_rule.delta_rule(self.form, *rule, chunk_size=self.chunk_size, initial_state=s0,
                                   output_final_state=return_state)
    o_blhv, s_bhkv = result if return_state else (result, None)
    y_bld = self._output(o_blhv, gate).astype(x_bld.dtype)
    return (y_bld, dict(conv=conv_state, s=s_bhkv)) if return_state else y_bld

  def init_state(self, batch_size: int) -> dict[str, Any]:
    """The conv window (b, conv_size−1, c): the last conv inputs, q | k | v before the conv; and S per head
    (b, h, k, v)."""
    h = self.num_heads
    s = jnp.zeros((batch_size, h, self.key_width // h, self.value_width // h), jnp.float32)
    return dict(conv=self.conv.init_state(batch_size), s=s)

  def step(self, state: dict[str, Any], x_bd: jax.Array) -> tuple[dict[str, Any], jax.Array]:
    conv_in, rest = self._split(self.in_proj(x_bd))
    conv_state, qkv_bc = self.conv.step(state["conv"], conv_in)
    rule, gate = self._rule_inputs(qkv_bc[:, None], rest[:, None])
    s_bhkv, o_bhv = delta_rule.step(state["s"], *(x[:, 0] for x in rule))
    y_bd = self._output(o_bhv[:, None], gate)[:, 0]
    return dict(conv=conv_state, s=s_bhkv), y_bd.astype(x_bd.dtype)
