"""Time the MQAR generator: seconds for 100,000 examples (not a test).

    python experiments/bench_data.py [--repeats 3] [--num-examples 100000]

Prints one line per setting with every repeat; the first repeat also pays for
first-touch page faults of the ~400 MB output at L=512.
"""

import argparse
import os
import time

from zoo_jax.data.mqar import generate_mqar

SETTINGS = [
    dict(vocab_size=8192, seq_len=512, num_kv_pairs=64),
    dict(vocab_size=8192, seq_len=64, num_kv_pairs=4),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-examples", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"cpus available: {len(os.sched_getaffinity(0))}")
    for setting in SETTINGS:
        for random_non_queries in (False, True):
            seconds = []
            for repeat in range(args.repeats):
                start = time.perf_counter()
                generate_mqar(
                    **setting,
                    num_examples=args.num_examples,
                    seed=repeat,
                    random_non_queries=random_non_queries,
                )
                seconds.append(time.perf_counter() - start)
            name = ", ".join(f"{k}={v}" for k, v in setting.items())
            times = " ".join(f"{s:.2f}" for s in seconds)
            print(
                f"{args.num_examples} examples, {name}, random_non_queries={random_non_queries}: "
                f"best {min(seconds):.2f} s (runs: {times})"
            )


if __name__ == "__main__":
    main()
