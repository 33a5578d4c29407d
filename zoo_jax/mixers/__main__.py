"""`python -m zoo_jax.mixers`: every registered mixer, its default hyperparameters and state-size formula."""

import dataclasses

from zoo_jax import mixers


def main() -> None:
  rows = []
  for name in mixers.names():
    spec = mixers.get(name)
    defaults = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(spec.hparams))
    rows.append((name, spec.state_size_formula, defaults))
  width = max(len(r[0]) for r in rows)
  print(f"{'mixer':<{width}}  state size per layer (d = d_model, L = seq_len)")
  for name, formula, defaults in rows:
    print(f"{name:<{width}}  {formula}\n{'':<{width}}    defaults: {defaults}")


if __name__ == "__main__":
  main()
