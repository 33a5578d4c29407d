"""Autoregressive generation from a `LanguageModel`: one prefill call, then a jitted decode loop.

    tokens_bn = generate(model, prompt_bl, max_new_tokens=n)                         # greedy
    tokens_bn = generate(model, prompt_bl, n, temperature=0.8, top_k=40, rng=key)    # sampled

The prompt goes through the parallel forms once (`model(prompt, return_state=True)`: every mixer's
chunked / FFT / attention form, returning its recurrent state); each new token is then one
`model.step(state, token)` inside a `jax.lax.scan` whose carry is the model's state pytree (KV caches,
conv windows, SSM states, the position). The whole of it is one jitted program per (model, shapes,
sampling options); it can also be called inside a caller's `jax.jit`, and the parameters may be sharded
(the trainer's mesh): the program follows their shardings.

Dimension legend: b batch, l prompt length, n new tokens, v vocabulary.

Capacity: attention's KV cache (and a long convolution's history, and learned positions) hold
`cfg.seq_len` positions, so prompt length + max_new_tokens must be ≤ seq_len (a one-line ValueError).
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp


def check_capacity(model, prompt_len: int, max_new_tokens: int) -> None:
  """A one-line ValueError unless the sequence fits the model's `seq_len` positions (the KV cache)."""
  seq_len = model.cfg.seq_len
  if prompt_len + max_new_tokens > seq_len:
    raise ValueError(f"generate: prompt length {prompt_len} + max_new_tokens {max_new_tokens} = "
                     f"{prompt_len + max_new_tokens} exceeds the model's seq_len {seq_len} (its KV cache capacity)")


def next_token(logits_bv: jax.Array, key: jax.Array | None, temperature: float, top_k: int | None) -> jax.Array:
  """Greedy (temperature 0) or a sample of softmax(logits / temperature) over the top_k logits; (b,) int32."""
  if temperature == 0.0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits_bv = logits_bv.astype(jnp.float32) / temperature
  if top_k is not None and top_k < logits_bv.shape[-1]:
    kth_b1 = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
    logits_bv = jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)
  return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "temperature", "top_k"))
def _generate(model, prompt_bl, rng, *, max_new_tokens: int, temperature: float, top_k: int | None) -> jax.Array:
  keys = jax.random.split(rng, max_new_tokens) if rng is not None else None  # None: greedy
  # Prefill: the parallel forms over the prompt; the head only at its last position.
  h_bld, state = model.hidden(prompt_bl, return_state=True)
  logits_bv = model.head(h_bld[:, -1:])[:, 0]
  first_b = next_token(logits_bv, None if keys is None else keys[0], temperature, top_k)

  rest_nb = decode(model, state, first_b, max_new_tokens - 1, temperature=temperature, top_k=top_k,
                   keys=None if keys is None else keys[1:])
  return jnp.concatenate([first_b[:, None], rest_nb.T], axis=1)


def decode(model, state, token_b: jax.Array, num_tokens: int, *, temperature: float = 0.0,
           top_k: int | None = None, keys: jax.Array | None = None) -> jax.Array:
  """The decode loop: `num_tokens` tokens (num_tokens, b) after `token_b` (b,) from the model's `state`,
  each one `model.step` and `next_token`, in a `jax.lax.scan` carrying the state (call it under jit).
  `keys` (num_tokens, ...) for sampling; None for greedy decoding."""

  def body(carry, key):
    state, token_b = carry
    state, logits_bv = model.step(state, token_b)
    token_b = next_token(logits_bv, key, temperature, top_k)
    return (state, token_b), token_b

  return jax.lax.scan(body, (state, token_b), keys, length=num_tokens)[1]


def generate(model, prompt_bl: jax.Array, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, rng: jax.Array | None = None) -> jax.Array:
  """(b, max_new_tokens) int32 tokens continuing `prompt_bl` (b, l): greedy when `temperature` is 0, else
  sampled from softmax(logits / temperature), restricted to the `top_k` largest logits when given, with
  `rng` (required for sampling; the same rng gives the same tokens).

  Every mixer of the model needs a recurrent form (`init_state` / `step`); l + max_new_tokens ≤ seq_len.
  """
  b, l = prompt_bl.shape
  if l < 1:
    raise ValueError("generate: the prompt must hold at least one token")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  check_capacity(model, l, max_new_tokens)
  if temperature < 0.0:
    raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
  if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f"generate: top_k must be a positive integer or None, got {top_k!r}")
  if temperature > 0.0 and rng is None:
    raise ValueError("generate: sampling (temperature > 0) needs an rng key")
  for i, block in enumerate(model.blocks):
    inner = getattr(block.mixer, "mixer", block.mixer)  # a hybrid's layer mixer
    if not (callable(getattr(block.mixer, "step", None)) and callable(getattr(inner, "step", None))):
      raise ValueError(f"generate: layer {i}'s mixer {type(inner).__name__} has no recurrent form (step)")
  return _generate(model, jnp.asarray(prompt_bl, jnp.int32), None if temperature == 0.0 else rng,
                   max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k)
