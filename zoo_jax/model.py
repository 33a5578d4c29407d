"""The language model every mixer is measured in: embeddings, residual blocks, final norm, tied LM head.

    tokens -> embed (+ learned positions) -> n_layers × Block -> LayerNorm -> logits = h Eᵀ  (E tied)

Blocks are pre-norm residual blocks, a sequence mixer then a state mixer:

    prenorm:  x = x + mixer(LN1(x));  x = x + state_mixer(LN2(x))        (state mixer 'none': skipped)
    zoology:  the same, except that with state mixer 'none' the second line is x = x + LN2(x).
    mamba:    x = x + mixer(RMSNorm(x)), one branch, no state mixer (Zoology's `MambaBlock`).

The `zoology` variant reproduces Zoology's `TransformerBlock`, which carries the residual stream separately
and returns `state_mixer(LN2(residual))` with `state_mixer = Identity` when there is no MLP; the next block
adds that to the residual, so every layer adds a normalised copy of the residual. Use it for numbers that
are comparable with the paper (its MQAR runs have no MLP); `prenorm` is the conventional block.

Dimension legend: b batch, l sequence length, d model width, v vocabulary, k labelled positions per example.

Differences from Zoology's `LanguageModel`: no dropout or stochastic depth (Zoology's MQAR configs set them
to 0); the LM head can be applied at chosen positions only (`logits_at`), which is where MQAR's loss lives.
"""

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from zoo_jax import layers, mixers

STATE_MIXERS = ("none", "mlp", "glu")
BLOCKS = ("zoology", "prenorm", "mamba")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LN_EPS = 1e-5  # PyTorch's LayerNorm default, as in Zoology


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  n_layers: int
  seq_len: int  # the longest sequence the model sees; sizes learned positions and long filters
  mixer: Any  # mixer config mapping {'name': ..., **hparams}
  state_mixer: str = "none"
  state_mixer_hidden_mult: int = 4
  block: str = "zoology"
  learned_positions: bool = False
  dtype: str = "float32"

  @classmethod
  def from_config(cls, model_cfg: Any, *, vocab_size: int, seq_len: int) -> "ModelConfig":
    """From the `model` section of a run config (a ConfigDict or mapping); strict about keys."""
    cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    accepted = {f.name for f in dataclasses.fields(cls)} - {"vocab_size", "seq_len"}
    for key in cfg:
      if key not in accepted:
        raise ValueError(f"model.{key} is not a model option; accepted: {sorted(accepted)}")
    required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING} - {"vocab_size", "seq_len"}
    for key in sorted(required - set(cfg)):
      raise ValueError(f"model.{key} is missing from the config")
    out = cls(vocab_size=vocab_size, seq_len=seq_len, **cfg)
    out.validate()
    return out

  def validate(self) -> None:
    for name in ("vocab_size", "d_model", "n_layers", "seq_len", "state_mixer_hidden_mult"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
    if not isinstance(self.learned_positions, bool):
      raise ValueError(f"model.learned_positions must be true or false, got {self.learned_positions!r}")
    if self.state_mixer not in STATE_MIXERS:
      raise ValueError(f"model.state_mixer must be one of {STATE_MIXERS}, got {self.state_mixer!r}")
    if self.block not in BLOCKS:
      raise ValueError(f"model.block must be one of {BLOCKS}, got {self.block!r}")
    if self.block == "mamba" and self.state_mixer != "none":
      raise ValueError(f"model.state_mixer must be 'none' with model.block='mamba' (Zoology's MambaBlock has "
                       f"no state mixer), got {self.state_mixer!r}")
    if self.dtype not in DTYPES:
      raise ValueError(f"model.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
    # Parses the mixer config (one-line errors naming the field) and checks every layer's hparams against
    # the width and length it gets (heads dividing d_model, a kernel_size list shorter than n_layers, ...)
    # at start-up, before anything is built.
    for i in range(self.n_layers):
      mixers.check_shapes(self.mixer, d_model=self.d_model, seq_len=self.seq_len, layer_idx=i)
    self.state_size()

  def state_size(self) -> int:
    """Recurrent state of the whole model, elements per example: the sum of the layers' states."""
    return sum(mixers.state_size(self.mixer, d_model=self.d_model, seq_len=self.seq_len, layer_idx=i)
               for i in range(self.n_layers))


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
    dtype = DTYPES[cfg.dtype]
    d = cfg.d_model
    if cfg.block == "mamba":
      self.norm1 = nnx.RMSNorm(d, epsilon=LN_EPS, dtype=dtype, rngs=rngs)
    else:
      self.norm1 = nnx.LayerNorm(d, epsilon=LN_EPS, dtype=dtype, rngs=rngs)
    self.mixer = mixers.build(cfg.mixer, d_model=d, seq_len=cfg.seq_len, layer_idx=layer_idx,
                              n_layers=cfg.n_layers, rngs=rngs, dtype=dtype)
    needs_norm2 = cfg.state_mixer != "none" or cfg.block == "zoology"
    self.norm2 = nnx.LayerNorm(d, epsilon=LN_EPS, dtype=dtype, rngs=rngs) if needs_norm2 else None
    state_mixer_cls = {"none": None, "mlp": layers.MLP, "glu": layers.GLU}[cfg.state_mixer]
    self.state_mixer = state_mixer_cls and state_mixer_cls(
        d, cfg.state_mixer_hidden_mult, n_layers=cfg.n_layers, rngs=rngs, dtype=dtype)

  def __call__(self, x_bld: jax.Array, tokens_bl: jax.Array | None = None) -> jax.Array:
    x_bld = x_bld + mixers.apply(self.mixer, self.norm1(x_bld), tokens_bl)  # token ids if it reads them
    if self.state_mixer is not None:
      x_bld = x_bld + self.state_mixer(self.norm2(x_bld))
    elif self.norm2 is not None:  # Zoology's block with an Identity state mixer
      x_bld = x_bld + self.norm2(x_bld)
    return x_bld


class LanguageModel(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    self.dtype = DTYPES[cfg.dtype]
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype, rngs=rngs,
                           embedding_init=layers.logical(layers.normal(), ("vocab", "embed")))
    self.pos_embed = nnx.Embed(
        cfg.seq_len, cfg.d_model, dtype=self.dtype, rngs=rngs,
        embedding_init=layers.logical(layers.normal(), (None, "embed"))) if cfg.learned_positions else None
    self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
    self.final_norm = nnx.LayerNorm(cfg.d_model, epsilon=LN_EPS, dtype=self.dtype, rngs=rngs)

  def embed_tokens(self, tokens_bl: jax.Array) -> jax.Array:
    x_bld = self.embed(tokens_bl)
    if self.pos_embed is not None:
      x_bld = x_bld + self.pos_embed(jnp.arange(tokens_bl.shape[1]))[None]
    return x_bld

  def hidden(self, tokens_bl: jax.Array) -> jax.Array:
    """Final-norm hidden states (b, l, d), before the LM head."""
    x_bld = self.embed_tokens(tokens_bl)
    for block in self.blocks:
      x_bld = block(x_bld, tokens_bl)
    return self.final_norm(x_bld)

  def head(self, h_bkd: jax.Array) -> jax.Array:
    """Tied LM head; logits in float32 whatever the compute dtype."""
    return jnp.einsum("bkd,vd->bkv", h_bkd, self.embed.embedding[...].astype(h_bkd.dtype),
                      preferred_element_type=jnp.float32)

  def __call__(self, tokens_bl: jax.Array) -> jax.Array:
    """Logits at every position, (b, l, v)."""
    return self.head(self.hidden(tokens_bl))

  def logits_at(self, tokens_bl: jax.Array, positions_bk: jax.Array) -> jax.Array:
    """Logits only at `positions_bk` (b, k): MQAR labels k << l positions, and at Zoology's vocabulary of
    8192 the head is most of the FLOPs, so the head is applied after gathering those positions."""
    h_bld = self.hidden(tokens_bl)
    h_bkd = jnp.take_along_axis(h_bld, positions_bk[..., None], axis=1)
    return self.head(h_bkd)
