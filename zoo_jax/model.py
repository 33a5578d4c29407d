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

Dropout (issue 19), as Zoology's `LanguageModel` places it, training only, all rates 0 by default (so
zoo_jax's runs, numbers and parameter trees are unchanged unless a config sets them):
  embed_dropout   on the embeddings (token + learned positions), i.e. on layer 0's input;
  resid_dropout   on the output of every residual branch before it is added: the mixer's, and the state
                  mixer's (the zoology block's LN2(x) term when the state mixer is 'none');
  model.mixer.dropout   attention's, on the softmax probabilities (`zoo_jax.mixers.attention`).
Zoology's `TransformerBlock` carries the residual separately: `dropout1 = nn.Dropout(embed_dropout if
layer_idx == 0 else resid_dropout)` acts on the block's input `hidden_states` (layer 0: the embeddings;
later layers: the previous block's state-mixer output, the branch, not the residual sum), `dropout2 =
nn.Dropout(resid_dropout)` on the sequence mixer's output, and `LMBackbone.drop_f =
nn.Dropout(resid_dropout)` on the last block's output (`zoology/model.py` at 0cd64f8: `TransformerBlock`
lines 113-130, `drop_f` lines 155 and 167); in zoo_jax's single-stream blocks that is the placement above.
Zoology's `ModelConfig` defaults `embed_dropout = 0.1`, `resid_dropout = 0.0`, `drop_path = 0.0`
(`zoology/config.py` at 0a76ef2, lines 88-90), so its runs drop only the embeddings, and its Figure-2
configs also give attention `MHA(dropout=0.1)`
(`zoology/experiments/iclr24_zoology_figure2/configs.py` at 0c59e61, lines 55-61):
`zoo_jax.configs.figure2.ZOOLOGY_DROPOUT`. Zoology's `MambaBlock` has no dropout (its Mamba runs drop
nothing: resid 0); here the rates apply to every block type. Stochastic depth (`drop_path`, 0 in Zoology's
runs) is not implemented.

Randomness is stateless: the training forward takes `dropout_key` (the trainer derives it from the model's
seed and the step, `zoo_jax.trainer.dropout_key`); the embeddings draw from fold_in(key, 0), layer i from
fold_in(key, i + 1) (then 0: its mixer branch, 1: its state-mixer branch, 2: attention), in the loop, under
remat and under `scan_layers` alike (the scan carries the layer index), so the three give the same masks.
Without a key (evaluation, prefill, `step`, generation) nothing is dropped.

Also: the LM head can be applied at chosen positions only (`logits_at`), which is where MQAR's loss lives.
The state mixers 'mlp' and 'glu' are Zoology's `MLP` and `GLU` (exact GELU, see `layers.py`).

Prefill → decode (issue 16). `init_state(b)` is the model's recurrent state: {'blocks': [each layer's mixer
state, `mixer.init_state(b)`], 't': (b,) int32, the number of positions seen}. A hybrid's layer carries the
state of its own mixer (a KV cache in an attention layer, an input window in a short-conv layer). Norms,
state mixers, embeddings and the head act per position and hold no state. Then

    logits, state = model(prompt_bl, return_state=True)      # prefill: the parallel forms, one call
    state, logits_bv = model.step(state, token_b)              # decode: each mixer's `step`, one token
    logits = model(tokens_bl, state=state)                     # the parallel forms, continuing at t

continue the sequence the state has seen: learned positions are t..t+l-1, each mixer continues from its
own state (the mixers' state-passing contract, `zoo_jax.mixers.registry`). Attention's KV cache holds
`seq_len` positions, so t + l must stay within `seq_len` (`zoo_jax.generate` checks it). With `state=None`
and no `return_state` the forward is the training one, unchanged. `zoo_jax.generate.generate` runs a
prefill then a jitted decode loop.

Memory of the training forward (issue 18). Three options, all off by default (the tiny and MQAR models'
numbers and parameter trees are unchanged), on in the paper-size LM presets (`zoo_jax/configs/lm.py`):
  remat         'none' | 'full' | 'save_matmuls': each Block's forward under `jax.checkpoint`; 'full' keeps
                only the block's input for the backward (recomputes the block), 'save_matmuls' also keeps the
                outputs of matmuls without batch dimensions (projections, MLP; not attention scores:
                `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`).
  scan_layers   the training forward runs the blocks as one `jax.lax.scan` over the layers' parameters,
                stacked at call time, so the parameter tree, checkpoints and prefill / step (which keep the
                Python loop) are unchanged. The scanned unit is the shortest period p of the layers (a
                hybrid or a per-layer kernel size repeats every p layers: p blocks per scan step);
                layers that never repeat give one step of all of them (the loop). A mixer that sows an
                auxiliary loss cannot be scanned or rematerialised (one-line error when traced).
  loss_chunk    positions per chunk of the LM loss's head and log-softmax (`tasks.token_logprobs`), so no
                (b, l, vocab) float32 array exists in the forward or the backward; 0: the whole row at once.
Parameters are float32 whatever `dtype` (the compute dtype): modules cast them; LayerNorm statistics,
attention's softmax and the head's logits and log-softmax are float32.
"""

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from zoo_jax import layers, mixers, sharding
from zoo_jax.layers import dropout

STATE_MIXERS = ("none", "mlp", "glu")
BLOCKS = ("zoology", "prenorm", "mamba")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
         "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
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
  remat: str = "none"
  scan_layers: bool = False
  loss_chunk: int = 0  # positions per chunk of the LM loss; 0: unchunked
  embed_dropout: float = 0.0  # training only (module docstring); Zoology's default is 0.1
  resid_dropout: float = 0.0  # on every residual branch's output, training only; Zoology's default 0.0

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
    if self.remat not in REMAT:
      raise ValueError(f"model.remat must be one of {tuple(REMAT)}, got {self.remat!r}")
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"model.scan_layers must be true or false, got {self.scan_layers!r}")
    if not isinstance(self.loss_chunk, int) or isinstance(self.loss_chunk, bool) or self.loss_chunk < 0:
      raise ValueError(f"model.loss_chunk must be an integer >= 0 (0: unchunked), got {self.loss_chunk!r}")
    for name in ("embed_dropout", "resid_dropout"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"model.{name} must be a number in [0, 1), got {value!r}")
    # Parses the mixer config (one-line errors naming the field) and checks every layer's hparams against
    # the width and length it gets (heads dividing d_model, a kernel_size list shorter than n_layers, ...)
    # at start-up, before anything is built.
    for i in range(self.n_layers):
      mixers.check_shapes(self.mixer, d_model=self.d_model, seq_len=self.seq_len, layer_idx=i)
    mixers.check_dtype(self.mixer, DTYPES[self.dtype])  # e.g. attention's 'cudnn' takes no float32
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
    self.resid_dropout = float(cfg.resid_dropout)

  def __call__(self, x_bld: jax.Array, tokens_bl: jax.Array | None = None, *, state: Any = None,
               return_state: bool = False, dropout_key: jax.Array | None = None
               ) -> jax.Array | tuple[jax.Array, Any]:
    """The block on (b, l, d). With `state` (the mixer's, like `init_state(b)`) the mixer continues from it;
    with `return_state` the result is (x_bld, the mixer's state after these l positions). `dropout_key`
    (training forward only): this layer's key, for resid dropout and the mixer's own dropout."""
    if state is None and not return_state:  # training: exactly the stateless forward
      y_bld = mixers.apply(self.mixer, self.norm1(x_bld), tokens_bl,  # token ids if it reads them
                           dropout_key=_fold(dropout_key, 2))
      x_bld = x_bld + dropout(y_bld, self.resid_dropout, _fold(dropout_key, 0))
      # FSDP: each block's output split by batch, as the embeddings' (inside a scan / remat too).
      return sharding.constrain_batch(self._state_mixer(x_bld, _fold(dropout_key, 1)))
    y_bld, state = mixers.apply(self.mixer, self.norm1(x_bld), tokens_bl, state=state, return_state=True)
    x_bld = self._state_mixer(x_bld + y_bld)
    return (x_bld, state) if return_state else x_bld

  def _state_mixer(self, x_bld: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """The second half of the block; acts on the last axis only, so on (b, l, d) and (b, d) alike."""
    if self.state_mixer is not None:
      x_bld = x_bld + dropout(self.state_mixer(self.norm2(x_bld)), self.resid_dropout, dropout_key)
    elif self.norm2 is not None:  # Zoology's block with an Identity state mixer
      x_bld = x_bld + dropout(self.norm2(x_bld), self.resid_dropout, dropout_key)
    return x_bld

  def init_state(self, batch_size: int) -> Any:
    """The mixer's recurrent state (a KV cache, a conv window, an SSM state...): `mixer.init_state(b)`."""
    return self.mixer.init_state(batch_size)

  def step(self, state: Any, x_bd: jax.Array) -> tuple[Any, jax.Array]:
    """One position, (b, d): the mixer's token recurrence, then the state mixer."""
    state, y_bd = self.mixer.step(state, self.norm1(x_bd))
    return state, self._state_mixer(x_bd + y_bd)


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
    # Whether a training forward draws any dropout mask (the trainer passes a key only then).
    self.uses_dropout = (cfg.embed_dropout > 0 or cfg.resid_dropout > 0
                         or any(getattr(block.mixer, "dropout_rate", 0.0) > 0 for block in self.blocks))

  def embed_tokens(self, tokens_bl: jax.Array, t_b: jax.Array | None = None) -> jax.Array:
    """Token (+ learned position) embeddings; positions t_b..t_b+l-1 when given, else 0..l-1."""
    x_bld = self.embed(tokens_bl)
    if self.pos_embed is not None:
      if t_b is None:
        x_bld = x_bld + self.pos_embed(jnp.arange(tokens_bl.shape[1]))[None]
      else:
        x_bld = x_bld + self.pos_embed(t_b[:, None] + jnp.arange(tokens_bl.shape[1])[None])
    return sharding.constrain_batch(x_bld)  # FSDP: the batch, not the width, split (sharding.activation_mesh)

  def init_state(self, batch_size: int) -> dict[str, Any]:
    """{'blocks': [layer i's mixer state], 't': (b,) int32 positions seen}: nothing seen yet."""
    return dict(blocks=[block.init_state(batch_size) for block in self.blocks],
                t=jnp.zeros((batch_size,), jnp.int32))

  def hidden(self, tokens_bl: jax.Array, *, state: dict[str, Any] | None = None, return_state: bool = False,
             dropout_key: jax.Array | None = None) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
    """Final-norm hidden states (b, l, d), before the LM head; from `state` and with the state after these
    positions as `__call__` describes. `dropout_key`: the training forward's dropout (module docstring)."""
    if state is None and not return_state:  # training: the stateless forward
      x_bld = dropout(self.embed_tokens(tokens_bl), self.cfg.embed_dropout, _fold(dropout_key, 0))
      if self.cfg.scan_layers:
        x_bld = self._scanned_blocks(x_bld, tokens_bl, dropout_key)
      elif self.cfg.remat != "none":
        for i, block in enumerate(self.blocks):
          x_bld = _remat_block(self.cfg.remat, *nnx.split(block), x_bld, tokens_bl, _fold(dropout_key, i + 1))
      else:
        for i, block in enumerate(self.blocks):
          x_bld = block(x_bld, tokens_bl, dropout_key=_fold(dropout_key, i + 1))
      return self.final_norm(x_bld)
    b, l = tokens_bl.shape
    t_b = jnp.zeros((b,), jnp.int32) if state is None else state["t"]
    block_states = [None] * len(self.blocks) if state is None else state["blocks"]
    x_bld = self.embed_tokens(tokens_bl, t_b)
    new_states = []
    for block, block_state in zip(self.blocks, block_states):
      x_bld, block_state = block(x_bld, tokens_bl, state=block_state, return_state=True)
      new_states.append(block_state)
    h_bld = self.final_norm(x_bld)
    return (h_bld, dict(blocks=new_states, t=t_b + l)) if return_state else h_bld

  def scan_period(self) -> int:
    """The shortest p dividing n_layers such that block i + p has block i's structure and parameter shapes
    (1 for a uniform stack, a hybrid's cycle, 2 for kernels alternating 3 / long); n_layers if none."""
    n = len(self.blocks)
    sigs = []
    for graphdef, state in (nnx.split(block) for block in self.blocks):
      leaves, treedef = jax.tree.flatten(state)
      sigs.append((graphdef, treedef, [(x.shape, x.dtype) for x in leaves]))
    return next(p for p in range(1, n + 1) if n % p == 0 and all(sigs[i] == sigs[i + p] for i in range(n - p)))

  def _scanned_blocks(self, x_bld: jax.Array, tokens_bl: jax.Array, dropout_key: jax.Array | None = None
                      ) -> jax.Array:
    """The blocks as a lax.scan over n_layers / p steps of p blocks, their parameters stacked per position
    in the period (the same values as the loop; `remat` applies per block inside the step). Each step also
    scans its layers' indices, so layer i's dropout key is the loop's, fold_in(key, i + 1)."""
    p = self.scan_period()
    split = [nnx.split(block) for block in self.blocks]
    graphdefs = [graphdef for graphdef, _ in split[:p]]
    stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *[state for _, state in split[j::p]]) for j in range(p)]
    layer_sp = jnp.arange(len(self.blocks), dtype=jnp.int32).reshape(-1, p)

    def unit(x_bld, xs):
      states, layer_p = xs
      for j, (graphdef, state) in enumerate(zip(graphdefs, states)):
        x_bld = _remat_block(self.cfg.remat, graphdef, state, x_bld, tokens_bl,
                             _fold(dropout_key, layer_p[j] + 1)).astype(x_bld.dtype)
      return x_bld, None

    return jax.lax.scan(unit, x_bld, (stacked, layer_sp))[0]

  def head(self, h_bkd: jax.Array) -> jax.Array:
    """Tied LM head; logits in float32 whatever the compute dtype."""
    return jnp.einsum("bkd,vd->bkv", h_bkd, self.embed.embedding[...].astype(h_bkd.dtype),
                      preferred_element_type=jnp.float32)

  def __call__(self, tokens_bl: jax.Array, state: dict[str, Any] | None = None, return_state: bool = False,
               *, dropout_key: jax.Array | None = None) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
    """Logits at every position, (b, l, v). Prefill: given `state` (like `init_state(b)`'s) the l tokens
    continue after the `state['t']` positions it has seen (every mixer from its own state, learned positions
    offset by t; t + l ≤ seq_len); with `return_state`, (logits, the state after these tokens).
    `dropout_key`: the training forward's dropout (module docstring); None: none."""
    if state is None and not return_state:
      return self.head(self.hidden(tokens_bl, dropout_key=dropout_key))
    h_bld, state = self.hidden(tokens_bl, state=state, return_state=True)
    logits_blv = self.head(h_bld)
    return (logits_blv, state) if return_state else logits_blv

  def step(self, state: dict[str, Any], token_b: jax.Array) -> tuple[dict[str, Any], jax.Array]:
    """Decode one token (b,) at position state['t'] with each mixer's `step`: (state, logits (b, v))."""
    t_b = state["t"]
    x_bd = self.embed_tokens(token_b[:, None], t_b)[:, 0]
    new_states = []
    for block, block_state in zip(self.blocks, state["blocks"]):
      block_state, x_bd = block.step(block_state, x_bd)
      new_states.append(block_state)
    logits_bv = self.head(self.final_norm(x_bd)[:, None])[:, 0]
    return dict(blocks=new_states, t=t_b + 1), logits_bv

  def logits_at(self, tokens_bl: jax.Array, positions_bk: jax.Array, *,
                dropout_key: jax.Array | None = None) -> jax.Array:
    """Logits only at `positions_bk` (b, k): MQAR labels k << l positions, and at Zoology's vocabulary of
    8192 the head is most of the FLOPs, so the head is applied after gathering those positions."""
    h_bld = self.hidden(tokens_bl, dropout_key=dropout_key)
    h_bkd = jnp.take_along_axis(h_bld, positions_bk[..., None], axis=1)
    return self.head(h_bkd)


def _fold(key: jax.Array | None, data: Any) -> jax.Array | None:
  """`jax.random.fold_in(key, data)`, or None without a key (no dropout)."""
  return None if key is None else jax.random.fold_in(key, data)


def _apply_block(graphdef: Any, state: Any, x_bld: jax.Array, tokens_bl: jax.Array,
                 dropout_key: jax.Array | None = None) -> jax.Array:
  """A block's training forward as a function of its state (for jax.checkpoint and lax.scan)."""
  block = nnx.merge(graphdef, state)
  y_bld = block(x_bld, tokens_bl, dropout_key=dropout_key)
  sown = nnx.state(block, nnx.Intermediate)
  if jax.tree.leaves(sown):
    raise ValueError("model.remat / model.scan_layers cannot carry a loss a layer sows (e.g. sparse_attention's "
                     "learned selection); set model.remat='none' and model.scan_layers=false")
  return y_bld


def _remat_block(remat: str, graphdef: Any, state: Any, x_bld: jax.Array, tokens_bl: jax.Array,
                 dropout_key: jax.Array | None = None) -> jax.Array:
  """`_apply_block`, under jax.checkpoint with `REMAT[remat]`'s policy unless remat is 'none' (the
  backward's recomputation redraws the same dropout masks from the same key)."""
  if remat == "none":
    return _apply_block(graphdef, state, x_bld, tokens_bl, dropout_key)
  return jax.checkpoint(_apply_block, static_argnums=(0,), policy=REMAT[remat])(graphdef, state, x_bld, tokens_bl,
                                                                               dropout_key)
