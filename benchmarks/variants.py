"""A/B of jbn's internal choices on this machine's backend, against flax.linen, in one process.

    python benchmarks/variants.py                   # the speed.py workloads, float32, forward and train
    python benchmarks/variants.py --only layer group --dtypes float32 bfloat16
    python benchmarks/variants.py --quick           # tiny shapes, a smoke test

jbn makes choices tuned on XLA:CPU that another backend may not want. Each variant below is jbn compiled with one
choice changed; the rows are timed interleaved in rounds as in `speed.py`, and the table shows each row's median
time and its ratio to jbn as shipped (below 1: the variant is faster). The variants are compiled ahead of time
with the change in effect, so the rows of one run differ only in that change.

* ``shipped``: jbn as it is.
* ``run-time branch``: the exact statistics choose their second pass at run time (the CPU's way).
* ``branch-free``: the exact statistics take their second pass on every call (the GPU's way).
* ``one-stage sums``: no split of reductions over a short minor run into two stages (`reduction_stages`).
* ``outside branch``: normalizing after the exact statistics' run-time branch instead of inside it (a batch norm
  forward pass is then 12 operations, which XLA:CPU runs on its thread pool, instead of 8 on the calling thread).
* ``no barriers``: no optimization barriers (they keep XLA:CPU from sharing full-size arrays between the forward
  and backward passes, from merging the two stages of a sum, and from writing a float32 copy of bfloat16 x).
* ``no kernels``: the XLA path where the CPU kernels would apply (``JBN_KERNELS=0``).
* ``flax.linen``: Flax's layer, for scale.
"""

import argparse
import contextlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

if __package__ in (None, ""):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from benchmarks import peers, speed
from jbn import _standardize, _stats

EVERY_PLATFORM = ("cpu", "cuda", "rocm", "tpu")


@contextlib.contextmanager
def _patched(*changes):
    """Sets (object, attribute, value) for the duration; restores the old values after."""
    old = [(target, name, getattr(target, name)) for target, name, _ in changes]
    for target, name, value in changes:
        setattr(target, name, value)
    try:
        yield
    finally:
        for target, name, value in old:
            setattr(target, name, value)


@contextlib.contextmanager
def _environment(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _one_stage(shape, axes):
    return None


def _normalizing_outside_the_branch(options, x, scale, bias, mask, fallback, epsilon):
    """`_standardize._forward` with the statistics' branch returning them, and normalizing after it."""
    stats = _standardize.moments_of(options, x, mask)
    return _standardize._normalized(options, x, scale, bias, fallback, epsilon, stats)


VARIANTS = {
    "shipped": contextlib.nullcontext,
    "run-time branch": lambda: _patched((_stats, "BRANCH_FREE_PLATFORMS", ())),
    "branch-free": lambda: _patched((_stats, "BRANCH_FREE_PLATFORMS", EVERY_PLATFORM)),
    "one-stage sums": lambda: _patched(
        (_stats, "reduction_stages", _one_stage), (_standardize, "reduction_stages", _one_stage)
    ),
    "outside branch": lambda: _patched((_standardize, "_forward", _normalizing_outside_the_branch)),
    "no barriers": lambda: _patched((lax, "optimization_barrier", lambda value: value)),
    "no kernels": lambda: _environment("JBN_KERNELS", "0"),
}


def _compiled(row, mode, x, ct, change):
    """`row`'s forward or train call, traced and compiled with `change` in effect."""
    args = (x, row.params, row.state) if mode == "forward" else (x, row.params, row.state, ct)
    function = row.forward if mode == "forward" else row.train
    with change():
        executable = function.lower(*args).compile()
    return lambda: executable(*args)


def run_workload(workload, dtype, rounds, repeats):
    """Median seconds per call of every variant and flax.linen, both modes: a list of result dicts."""
    x, ct = speed._inputs(workload, dtype)
    flax = peers.build_linen(workload)
    results = []
    for mode in ("forward", "train"):
        calls = {}
        for name, change in VARIANTS.items():
            calls[name] = (_compiled(peers.build_jbn(workload), mode, x, ct, change), peers.wait_jax)
        if flax is not None:
            native_x, native_ct = flax.to_native(x), flax.to_native(ct)
            calls["flax.linen"] = (_compiled(flax, mode, native_x, native_ct, contextlib.nullcontext), peers.wait_jax)
        times = speed.time_interleaved(calls, rounds, repeats)
        shipped = times["shipped"]
        for name, row_times in times.items():
            results.append(
                {
                    "workload": workload.name,
                    "dtype": jnp.dtype(dtype).name,
                    "mode": mode,
                    "row": name,
                    "ms": float(np.median(row_times)) * 1e3,
                    "over_shipped": float(np.median(row_times / shipped)),
                }
            )
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 3 rounds: a smoke test")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--only", nargs="+", default=None, help="norms to run (batch, layer, ...)")
    parser.add_argument("--repeats", type=int, default=None, help="calls per timed sample (as in speed.py)")
    args = parser.parse_args(argv)
    speed.keep_freed_memory()
    rounds = 3 if args.quick else args.rounds
    repeats = args.repeats or (1 if jax.default_backend() == "cpu" else 20)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {repeats} calls per sample")
    print(f"{'workload':30s} {'dtype':8s} {'mode':7s} {'row':16s} {'ms':>8s} {'/shipped':>8s}")
    results = []
    for workload in peers.workloads(args.quick):
        if args.only and workload.norm not in args.only:
            continue
        for dtype in args.dtypes:
            for r in run_workload(workload, jnp.dtype(dtype), rounds, repeats):
                print(
                    f"{r['workload']:30s} {r['dtype']:8s} {r['mode']:7s} {r['row']:16s} {r['ms']:8.3f} "
                    f"{r['over_shipped']:8.2f}",
                    flush=True,
                )
                results.append(r)
    return results


if __name__ == "__main__":
    main()
