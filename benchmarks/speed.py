"""Speed of jbn against Flax (linen, nnx), Haiku, Equinox and PyTorch, forward and forward+backward.

    python benchmarks/speed.py                # every workload, float32 and bfloat16, a table on stdout
    python benchmarks/speed.py --quick        # tiny shapes, a smoke test (under a minute)
    python benchmarks/speed.py --json out.json --rows jbn flax.linen torch --dtypes float32

Method. The machine is shared and noisy, so for each workload and mode the rows are timed interleaved in rounds
(in a shuffled order each round) in one process, after warm-up, each call waited for (``block_until_ready``; on
an accelerator, `--repeats` calls back to back and a wait for the last); each round gives a ratio jbn / row, and
the table shows its median and interquartile range over rounds. In the same rounds a copy of x (read x, write an
array of its size) gives the machine's copy bandwidth at that size; each row's fraction of that limit counts the
bytes a normalization layer must move: forward 2x the bytes of x (read x, write y), forward+backward 5x (also
read x and dy, write dx). "saved" is what the row keeps for its backward pass, as a multiple of the bytes of x.

Two settings keep the rows from disturbing each other: glibc is told to keep freed buffers (otherwise every
call of every row page-faults on fresh memory, which dominates the timings and swings between runs), and
PyTorch's OpenMP threads sleep instead of spinning after each call (otherwise they take the cores from the row
timed next).

Rows whose library is not installed are skipped (``pip install -e ".[bench]"`` installs them; PyTorch's CPU
build: ``pip install torch --index-url https://download.pytorch.org/whl/cpu``). PyTorch runs on the GPU where JAX
does and PyTorch sees one.
"""

import argparse
import ctypes
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from benchmarks import peers

MINIMAL_TRAFFIC = {"forward": 2.0, "train": 5.0}  # bytes moved per byte of x


def quiet_threads():
    """PyTorch's OpenMP threads spin for a while after each call, stealing the cores from the next row; make
    them sleep instead (before torch is imported; an explicit OMP_WAIT_POLICY is left alone)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def keep_freed_memory():
    """Asks glibc to keep freed buffers (no mmap per large buffer, no trimming), if glibc is there."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)


def time_interleaved(calls: dict, rounds: int, repeats: int = 1) -> dict:
    """Seconds per call for each named ``(call, wait)``, timed in interleaved rounds: {name: array}.

    `call` takes no arguments; `wait(result)` returns once the result is computed. Each sample is `repeats` calls
    back to back and one wait for the last (on an accelerator they queue, so the sample measures throughput).
    The order within a round is shuffled (seeded), so that no row always runs right after the same other one.
    """
    for call, wait in calls.values():
        wait(call())
        wait(call())
    times = {name: np.zeros(rounds) for name in calls}
    names, rng = list(calls), np.random.default_rng(0)
    for r in range(rounds):
        for name in rng.permutation(names):
            call, wait = calls[name]
            start = time.perf_counter()
            for _ in range(repeats - 1):
                call()
            wait(call())
            times[name][r] = (time.perf_counter() - start) / repeats
    return times


def _runnable(calls: dict, what: str) -> dict:
    """The calls that run once without an error; the others are left out with a note on stderr (a peer that
    cannot run this dtype, e.g. bfloat16 inputs with float32 weights)."""
    runnable = {}
    for name, (call, wait) in calls.items():
        try:
            wait(call())
        except Exception as error:
            print(f"  {what}, {name}: {type(error).__name__}: {str(error)[:200]}", file=sys.stderr)
        else:
            runnable[name] = (call, wait)
    return runnable


def _inputs(workload, dtype):
    x = jax.random.normal(jax.random.key(1), workload.shape, jnp.float32) * 2.0 + 0.5
    ct = jax.random.normal(jax.random.key(2), workload.shape, jnp.float32)
    return x.astype(dtype), ct.astype(dtype)


def run_workload(workload, dtype, rows, rounds, repeats=1):
    """Times every row on one workload and dtype, both modes; returns a list of result dicts."""
    x, ct = _inputs(workload, dtype)
    built = {}
    for name, build in rows.items():
        row = build(workload)
        if row is not None:
            built[name] = (row, row.to_native(x), row.to_native(ct))
    copy = jax.jit(lambda x, factor: x * factor)
    factor = jnp.asarray(1.0, dtype)
    results = []
    for mode in ("forward", "train"):
        calls = {"copy": (lambda: copy(x, factor), peers.wait_jax)}
        for name, (row, native_x, native_ct) in built.items():
            if mode == "forward":
                call = functools.partial(row.forward, native_x, row.params, row.state)
            else:
                call = functools.partial(row.train, native_x, row.params, row.state, native_ct)
            calls[name] = (call, row.wait)
        times = time_interleaved(_runnable(calls, f"{workload.name} {mode}"), rounds, repeats)
        copy_time = np.median(times.pop("copy"))
        reference = times.get("jbn")
        for name, row_times in times.items():
            row, native_x, _ = built[name]
            ratio = reference / row_times if reference is not None else np.full(rounds, np.nan)
            q1, median, q3 = np.percentile(ratio, [25, 50, 75])
            seconds = float(np.median(row_times))
            saved = row.residual_bytes(native_x) / x.nbytes if mode == "train" else 0.0
            results.append(
                {
                    "workload": workload.name,
                    "dtype": jnp.dtype(dtype).name,
                    "mode": mode,
                    "row": name + (f" ({row.note})" if row.note else ""),
                    "ms": seconds * 1e3,
                    "jbn_over_row": float(median),
                    "iqr": [float(q1), float(q3)],
                    "roofline": MINIMAL_TRAFFIC[mode] / 2.0 * copy_time / seconds,
                    "saved_x": float(saved),
                    "copy_gbs": 2 * x.nbytes / copy_time / 1e9,
                }
            )
    return results


HEADER = (
    f"{'workload':30s} {'dtype':8s} {'mode':7s} {'row':18s} {'ms':>8s} {'jbn/row':>8s} {'IQR':>13s} "
    f"{'roofline':>8s} {'saved':>6s}"
)


def print_rows(results):
    """One line per row, a blank line after each workload, dtype and mode."""
    previous = None
    for r in results:
        key = (r["workload"], r["dtype"], r["mode"])
        if previous is not None and key != previous:
            print()
        previous = key
        q1, q3 = r["iqr"]
        saved = f"{r['saved_x']:5.2f}x" if r["mode"] == "train" else ""
        print(
            f"{r['workload']:30s} {r['dtype']:8s} {r['mode']:7s} {r['row']:18s} {r['ms']:8.3f} "
            f"{r['jbn_over_row']:8.2f} [{q1:5.2f}, {q3:5.2f}] {100 * r['roofline']:7.0f}% {saved:>6s}"
        )


def markdown(results) -> str:
    """The results as a Markdown table: one line per workload, dtype and mode; jbn / row per peer."""

    def column(r):
        return r["row"].split(" (")[0]  # "equinox (NCHW)" goes in the equinox column

    peers_seen = list(dict.fromkeys(column(r) for r in results if r["row"] != "jbn"))
    lines = [
        "| workload | dtype | mode | jbn ms | " + " | ".join(peers_seen) + " | jbn roofline | saved: jbn, Flax |",
        "|---" * (len(peers_seen) + 6) + "|",
    ]
    groups = {}
    for r in results:
        groups.setdefault((r["workload"], r["dtype"], r["mode"]), {})[column(r)] = r
    for (workload, dtype, mode), rows in groups.items():
        ours, flax = rows.get("jbn"), rows.get("flax.linen")
        if ours is None:
            continue
        ratios = [f"{rows[p]['jbn_over_row']:.2f}" if p in rows else "" for p in peers_seen]
        saved = f"{ours['saved_x']:.2f}x, {flax['saved_x']:.2f}x" if mode == "train" and flax else ""
        cells = [workload, dtype, mode, f"{ours['ms']:.2f}", *ratios, f"{100 * ours['roofline']:.0f}%", saved]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 5 rounds, float32: a smoke test")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--rows", nargs="+", default=list(peers.ROWS), choices=list(peers.ROWS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--only", nargs="+", default=None, help="norms to run (batch, layer, ...)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--markdown", action="store_true", help="also print the results as a Markdown table")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="calls per timed sample, back to back (default: 1 on the CPU, 20 on an accelerator, where one call of "
        "these sizes takes about as long as launching it)",
    )
    args = parser.parse_args(argv)
    keep_freed_memory()
    quiet_threads()
    rows, missing = peers.available(args.rows)
    if missing:
        print(f"skipped (not importable): {', '.join(missing)}", file=sys.stderr)
    rounds, dtypes = (5, ["float32"]) if args.quick else (args.rounds, args.dtypes)
    repeats = args.repeats or (1 if jax.default_backend() == "cpu" else 20)
    results = []
    print(HEADER)
    for workload in peers.workloads(args.quick):
        if args.only and workload.norm not in args.only:
            continue
        for dtype in dtypes:
            measured = run_workload(workload, jnp.dtype(dtype), rows, rounds, repeats)
            print_rows(measured)
            print(flush=True)
            results += measured
    if args.markdown:
        print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            device = jax.devices()[0].device_kind
            json.dump({"jax": jax.__version__, "device": device, "repeats": repeats, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
