"""A minimal PyTorch port of Zoology's language model and train step, for same-run speed comparisons.

Used by `experiments/bench_train.py` (not part of `zoo_jax`, never imported by the library). It follows
HazyResearch/zoology (`zoology/model.py`, `zoology/mixers/{attention,base_conv,convolution,hybrid}.py`,
`zoology/train.py`) as used by the Figure-2 MQAR runs:

- `TokenEmbeddings`: word embeddings, plus learned absolute positions when `max_position_embeddings > 0`
  (Zoology's attention runs only);
- `TransformerBlock` with the separate residual stream: `residual += mixer(LN1(residual))`, returns
  `state_mixer(LN2(residual))` with `state_mixer = Identity`, which the next block adds to the residual;
- `MHA`: `Wqkv` Linear d -> 3d with bias, causal softmax attention, `out_proj`. Zoology writes the softmax
  out as two einsums plus a -10000 causal mask (`attention_impl='zoology'` here); the default,
  `attention_impl='sdpa'`, is `F.scaled_dot_product_attention(is_causal=True)`: the same math in a fused
  kernel, measured 2-7x faster forward+backward on 2 CPU cores (torch 2.13, L 64-512), so a benchmark
  against the default is if anything generous to Zoology;
- `BaseConv`: `conv(u) * projection(u) + u`; `ShortConvolution` is a depthwise `Conv1d` padded by k-1 and
  truncated to L; the long conv is `ImplicitLongConvolution` (MLP 3 -> 16 -> ReLU -> d over Zoology's
  positional features) applied by `fft_conv` (rfft/irfft with n = 2L) plus u;
- final LayerNorm, LM head tied to the word embeddings and computed at EVERY position, then
  `CrossEntropyLoss` (ignore_index = -100) over the flattened (b·l, v) logits;
- init as Zoology's `_init_weights` (N(0, 0.02) linears and embeddings, zero biases, `out_proj`/`fc2`
  rescaled by 1/sqrt(2·n_layers); Conv1d keeps PyTorch's default), `AdamW(lr, weight_decay=0.1)`.

No dropout / stochastic depth, as in zoo_jax. Zoology's Figure-2 MQAR runs do use dropout: `ModelConfig`'s
default `embed_dropout = 0.1` on the embeddings (`TransformerBlock.dropout1` at layer 0; `resid_dropout`
and `drop_path` default to 0) and `MHA(dropout=0.1)` on the attention probabilities; both are left out
here (see `zoo_jax/model.py`'s docstring).

Mixer configs are zoo_jax's (`experiments/configs/mqar.py` RUNS): `{'name': 'attention', 'num_heads': 1}`,
`{'name': 'base_conv', 'kernel_size': [3, -1], 'implicit_long_conv': True}`, `{'name': 'hybrid',
'mixers': [...]}`.
"""

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

IGNORE_INDEX = -100
ATTENTION_IMPLS = ("sdpa", "zoology")


# ---------------------------------------------------------------------------------------------- Mixers


class MHA(nn.Module):

  def __init__(self, d_model: int, num_heads: int = 1, bias: bool = True, layer_idx: int | None = None,
               attention_impl: str = "sdpa", window: int | None = None):
    """`window` w: Zoology's `SlidingAttn` (block_size w), query i sees keys i − w .. i."""
    super().__init__()
    self.window = window
    assert d_model % num_heads == 0
    if attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    self.num_heads = num_heads
    self.head_dim = d_model // num_heads
    self.attention_impl = attention_impl
    self.Wqkv = nn.Linear(d_model, 3 * d_model, bias=bias)
    self.out_proj = nn.Linear(d_model, d_model)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, l, d = x.shape
    qkv = self.Wqkv(x).view(b, l, 3, self.num_heads, self.head_dim)  # "... (three h d) -> ... three h d"
    if self.attention_impl == "zoology":
      y = _zoology_self_attention(qkv, self.window)
    else:
      q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))  # (b, h, l, dh)
      if self.window is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
      else:
        dist = torch.arange(l)[:, None] - torch.arange(l)[None]
        band = (dist >= 0) & (dist <= self.window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=band.to(x.device)).transpose(1, 2)
    return self.out_proj(y.reshape(b, l, d))


def _zoology_self_attention(qkv: torch.Tensor, window: int | None = None) -> torch.Tensor:
  """Zoology's `SelfAttention.forward` without dropout: qkv (b, l, 3, h, dh) -> (b, l, h, dh); with `window`
  w, its `SlidingAttn`'s extra −10000 on the keys j < i − w."""
  seqlen = qkv.shape[1]
  q, k, v = qkv.unbind(dim=2)
  scores = torch.einsum("bthd,bshd->bhts", q, k * (1.0 / math.sqrt(q.shape[-1])))
  causal_mask = torch.triu(torch.full((seqlen, seqlen), -10000.0, device=scores.device), 1)
  if window is not None:
    causal_mask = causal_mask + torch.tril(torch.full_like(causal_mask, -10000.0), -window - 1)
  attention = torch.softmax(scores + causal_mask.to(dtype=scores.dtype), dim=-1, dtype=v.dtype)
  return torch.einsum("bhts,bshd->bthd", attention, v)


def fft_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
  """Zoology's `fft_conv(u, k, dropout_mask=None, gelu=False)`: u (b, d, l), k (d, l); returns conv + u."""
  seqlen = u.shape[-1]
  fft_size = 2 * seqlen
  k_f = torch.fft.rfft(k, n=fft_size) / fft_size
  u_f = torch.fft.rfft(u.to(dtype=k.dtype), n=fft_size)
  y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]
  return (y + u).to(dtype=u.dtype)


class ShortConvolution(nn.Module):

  def __init__(self, d_model: int, kernel_size: int):
    super().__init__()
    self.conv = nn.Conv1d(d_model, d_model, kernel_size=kernel_size, groups=d_model, padding=kernel_size - 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    l = x.size(1)
    return self.conv(x.transpose(1, 2))[..., :l].transpose(1, 2)


class PositionalEmbedding(nn.Module):
  """Complex exponential positional features [t, Re z, Im z] for implicit long-convolution filters."""

  def __init__(self, emb_dim: int, seq_len: int):
    super().__init__()
    t = torch.linspace(0, 1, seq_len)[None, :, None]
    bands = (emb_dim - 1) // 2
    t_rescaled = torch.linspace(0, seq_len - 1, seq_len)[None, :, None]
    w = 2 * math.pi * t_rescaled / seq_len
    f = torch.linspace(1e-4, bands - 1, bands)[None, None]
    z = torch.exp(-1j * f * w)
    self.z = nn.Parameter(torch.cat([t, z.real, z.imag], dim=-1), requires_grad=False)

  def forward(self, l: int) -> torch.Tensor:
    return self.z[:, :l]


class ImplicitLongConvolution(nn.Module):

  def __init__(self, d_model: int, l_max: int, d_emb: int = 3, d_hidden: int = 16):
    super().__init__()
    self.pos_emb = PositionalEmbedding(d_emb, l_max)
    self.mlp = nn.Sequential(nn.Linear(d_emb, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_model))

  def filter(self, l: int) -> torch.Tensor:
    return self.mlp(self.pos_emb(l)).transpose(1, 2)  # (1, d, l)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x.transpose(1, 2)
    y = fft_conv(x, self.filter(x.shape[-1]))
    return y.transpose(1, 2).to(dtype=x.dtype)


class LongConvolution(nn.Module):

  def __init__(self, d_model: int, l_max: int):
    super().__init__()
    self.filter = nn.Parameter(torch.randn(d_model, l_max))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x.transpose(1, 2)
    return fft_conv(x, self.filter).transpose(1, 2).to(dtype=x.dtype)


class BaseConv(nn.Module):

  def __init__(self, d_model: int, l_max: int, kernel_size: Any = 3, layer_idx: int | None = None,
               implicit_long_conv: bool = True, use_act: bool = False):
    super().__init__()
    self.use_act = use_act
    self.projection = nn.Linear(d_model, d_model)
    if isinstance(kernel_size, (list, tuple)):
      kernel_size = kernel_size[layer_idx]
    if kernel_size == -1:
      conv = ImplicitLongConvolution if implicit_long_conv else LongConvolution
      self.conv = conv(d_model, l_max=l_max)
    else:
      self.conv = ShortConvolution(d_model, kernel_size=kernel_size)

  def forward(self, u: torch.Tensor) -> torch.Tensor:
    u_conv = self.conv(u)
    u_proj = self.projection(u)
    if self.use_act:
      u_conv, u_proj = F.silu(u_conv), F.silu(u_proj)
    return u_conv * u_proj + u


PORTED = ("attention", "sliding_window", "base_conv", "hybrid")


def has_port(cfg: Mapping[str, Any]) -> bool:
  """Whether every mixer named in a zoo_jax mixer config has a port here."""
  cfg = dict(cfg)
  if cfg["name"] == "hybrid":
    return all(has_port(sub) for sub in cfg.get("mixers", ()))
  return cfg["name"] in PORTED


def build_mixer(cfg: Mapping[str, Any], *, d_model: int, l_max: int, layer_idx: int,
                attention_impl: str = "sdpa") -> nn.Module:
  """A zoo_jax mixer config dict -> the corresponding Zoology module."""
  cfg = dict(cfg)
  name = cfg.pop("name")
  if name == "attention":
    return MHA(d_model, num_heads=cfg.get("num_heads", 1), layer_idx=layer_idx, attention_impl=attention_impl)
  if name == "sliding_window":
    return MHA(d_model, num_heads=cfg.get("num_heads", 1), layer_idx=layer_idx, attention_impl=attention_impl,
               window=cfg.get("window_size", 64))
  if name == "base_conv":
    return BaseConv(d_model, l_max, kernel_size=cfg.get("kernel_size", 3), layer_idx=layer_idx,
                    implicit_long_conv=cfg.get("implicit_long_conv", True), use_act=cfg.get("use_act", False))
  if name == "hybrid":  # Zoology's Hybrid: layer i uses configs[i % len(configs)]
    subs = cfg["mixers"]
    return build_mixer(subs[layer_idx % len(subs)], d_model=d_model, l_max=l_max, layer_idx=layer_idx,
                       attention_impl=attention_impl)
  raise ValueError(f"zoology_torch_ref has no port of mixer {name!r}")


# ---------------------------------------------------------------------------------------------- Model


class TokenEmbeddings(nn.Module):

  def __init__(self, embed_dim: int, vocab_size: int, max_position_embeddings: int):
    super().__init__()
    self.word_embeddings = nn.Embedding(vocab_size, embed_dim)
    self.max_position_embeddings = max_position_embeddings
    if max_position_embeddings > 0:
      self.position_embeddings = nn.Embedding(max_position_embeddings, embed_dim)

  def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    embeddings = self.word_embeddings(input_ids)
    if self.max_position_embeddings > 0:
      position_ids = torch.arange(input_ids.shape[1], dtype=torch.long, device=input_ids.device)
      embeddings = embeddings + self.position_embeddings(position_ids)
    return embeddings


class TransformerBlock(nn.Module):

  def __init__(self, mixer_cfg: Mapping[str, Any], d_model: int, l_max: int, layer_idx: int,
               attention_impl: str = "sdpa"):
    super().__init__()
    self.sequence_mixer = build_mixer(mixer_cfg, d_model=d_model, l_max=l_max, layer_idx=layer_idx,
                                      attention_impl=attention_impl)
    self.state_mixer = nn.Identity()
    self.norm1 = nn.LayerNorm(d_model)
    self.norm2 = nn.LayerNorm(d_model)

  def forward(self, hidden_states, residual=None):
    residual = (hidden_states + residual) if residual is not None else hidden_states
    hidden_states = self.sequence_mixer(self.norm1(residual))
    residual = hidden_states + residual
    hidden_states = self.state_mixer(self.norm2(residual))
    return hidden_states, residual


def _init_weights(module: nn.Module, n_layers: int, initializer_range: float = 0.02) -> None:
  if isinstance(module, nn.Linear):
    nn.init.normal_(module.weight, std=initializer_range)
    if module.bias is not None:
      nn.init.zeros_(module.bias)
  elif isinstance(module, nn.Embedding):
    nn.init.normal_(module.weight, std=initializer_range)
  for name, p in module.named_parameters():
    if "out_proj.weight" in name or "fc2.weight" in name:
      nn.init.normal_(p, mean=0.0, std=initializer_range / math.sqrt(2 * n_layers))


class LanguageModel(nn.Module):

  def __init__(self, *, mixer: Mapping[str, Any], d_model: int, n_layers: int, vocab_size: int, l_max: int,
               learned_positions: bool, attention_impl: str = "sdpa"):
    super().__init__()
    self.embeddings = TokenEmbeddings(d_model, vocab_size, l_max if learned_positions else 0)
    self.layers = nn.ModuleList([TransformerBlock(mixer, d_model, l_max, i, attention_impl)
                                 for i in range(n_layers)])
    self.ln_f = nn.LayerNorm(d_model)
    self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
    self.apply(lambda m: _init_weights(m, n_layers))
    self.lm_head.weight = self.embeddings.word_embeddings.weight  # tied

  def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    hidden_states, residual = self.embeddings(input_ids), None
    for layer in self.layers:
      hidden_states, residual = layer(hidden_states, residual)
    hidden_states = self.ln_f(hidden_states + residual)
    return self.lm_head(hidden_states)  # (b, l, v): the head at every position

  def num_trainable_params(self) -> int:
    """Trainable parameters, the tied embedding once: what zoo_jax's `trainer.count_params` counts. (The
    implicit filters' positional features are a frozen `nn.Parameter` in Zoology; zoo_jax computes them.)"""
    return sum(p.numel() for p in self.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------- Training


class Trainer:
  """Zoology's `Trainer.train_epoch` body as a callable: one optimizer step per call, returns the loss."""

  def __init__(self, model: LanguageModel, *, learning_rate: float = 1e-3, weight_decay: float = 0.1):
    self.model = model.train()
    self.loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    self.optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)

  def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    self.optimizer.zero_grad()
    logits = self.model(inputs)
    loss = self.loss_fn(logits.reshape(-1, logits.shape[-1]), targets.flatten())
    loss.backward()
    self.optimizer.step()
    return loss.item()  # Zoology logs loss.item() every step (a sync; a no-op on CPU)
