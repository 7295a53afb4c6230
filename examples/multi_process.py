"""Synchronized batch norm across processes with jax.distributed: the same code as on one machine.

    python examples/multi_process.py                   # launches 2 worker processes on 127.0.0.1
    python examples/multi_process.py --processes 4 --epochs 3
    python examples/multi_process.py --process-id 0 --processes 2 --coordinator 10.0.0.1:1234   # one per host

Each worker calls ``jax.distributed.initialize`` (CPU collectives through gloo, JAX's default on CPU) and sees a
global mesh of every device of every process. jbn needs nothing more than ``axis_name``: the statistics are
``psum``-ed over the mesh axis, across processes as across devices.

1. Each process holds its own rows of a batch, a different number of them valid (masked): ``jbn.batch_norm``
   under ``shard_map`` gives every process the single-process statistics of the valid rows.
2. The digits MLP trains data-parallel over all processes (``examples/multi_device.py``'s training, on the global
   mesh): parameters and running statistics come out bit-identical in every process, and they match training
   in one process on the same global batches.

Launched without ``--process-id``, this script is the launcher: it picks a free port on the loopback address,
starts the workers with a timeout, stops all of them as soon as one fails, and compares their results.
"""

import argparse
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

LOCAL_DEVICES = 2  # CPU devices per worker process


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerError(RuntimeError):
    """A worker failed or the run timed out; the message holds the worker's id, exit status and last output."""


def launch(worker_args: list[str], processes: int, timeout: float, out: pathlib.Path) -> list[str]:
    """Runs `processes` workers of this script on 127.0.0.1; returns their outputs, or raises WorkerError.

    Every worker is stopped when one fails, when the timeout passes, or when the launcher is interrupted.
    """
    coordinator = f"127.0.0.1:{free_port()}"
    logs = [out / f"worker{i}.log" for i in range(processes)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    workers = []
    try:
        for i, log in enumerate(logs):
            command = [sys.executable, __file__, *worker_args, "--process-id", str(i), "--processes", str(processes)]
            command += ["--coordinator", coordinator, "--out", str(out)]
            with open(log, "w") as stream:
                workers.append(subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + timeout
        while None in [worker.poll() for worker in workers]:  # a list: poll every worker, each time
            for i, worker in enumerate(workers):
                if worker.returncode not in (None, 0):
                    raise WorkerError(f"worker {i} exited with status {worker.returncode}:\n{_tail(logs[i])}")
            if time.monotonic() > deadline:
                raise WorkerError(f"the workers did not finish within {timeout:.0f} s:\n{_tail(logs[0])}")
            time.sleep(0.05)
        for i, worker in enumerate(workers):
            if worker.returncode != 0:
                raise WorkerError(f"worker {i} exited with status {worker.returncode}:\n{_tail(logs[i])}")
        return [log.read_text() for log in logs]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait()


def _tail(log: pathlib.Path, lines: int = 15) -> str:
    return "\n".join(log.read_text().splitlines()[-lines:])


# ---- the worker: one per process --------------------------------------------------------------------------------


def initialize(coordinator: str, processes: int, process_id: int, timeout: int):
    import jax

    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if process_id != 0:
        wait_for_coordinator(coordinator, process_id, timeout)
    jax.distributed.initialize(coordinator, processes, process_id, initialization_timeout=timeout)


def wait_for_coordinator(coordinator: str, process_id: int, timeout: float):
    """Returns once the coordinator (process 0) accepts connections; exits with a clear message otherwise.

    Without this check, JAX aborts the process after `timeout` with "DEADLINE_EXCEEDED ... RegisterTask" and a
    C++ stack trace that suggests another task died.
    """
    host, port = coordinator.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError as error:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"process {process_id}: could not reach the coordinator at {coordinator} within {timeout} s "
                    f"({error}); is process 0 running, and does every process use its address?"
                ) from None
            time.sleep(0.2)


def batch_rows(process_id: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of the check batch: 2 rows per local device, the first `process_id + 1` valid."""
    rng = np.random.default_rng(process_id)
    x = (100.0 + rng.normal(size=(2 * LOCAL_DEVICES, 8))).astype(np.float32)
    valid = np.arange(len(x)) < process_id + 1
    x[~valid] = 1e6  # padding far from the data: counted by mistake, it would ruin the statistics
    return x, valid


def batch_norm_results(x, valid, axis_name=None):
    """jbn.batch_norm, jbn.linen.BatchNorm and the gradients of a small loss on rows `x` with `valid` rows.

    Under shard_map (`axis_name` given) each participant passes its own rows; the loss sums over every valid
    row of every participant.
    """
    import jax
    import jax.numpy as jnp

    import jbn
    import jbn.linen

    mask = valid[:, None]
    y, state = jbn.batch_norm(x, jbn.batch_norm_state(8), training=True, mask=mask, axis_name=axis_name)
    layer = jbn.linen.BatchNorm(use_running_average=False, momentum=0.9, axis_name=axis_name)
    variables = {"params": {"scale": jnp.linspace(0.5, 1.5, 8), "bias": jnp.zeros(8)}}
    variables["batch_stats"] = {"mean": jnp.zeros(8), "var": jnp.ones(8)}
    linen_y, updates = layer.apply(variables, x, mask=mask, mutable=["batch_stats"])

    def loss(x, scale):
        params = {"params": {"scale": scale, "bias": variables["params"]["bias"]}}
        out, _ = layer.apply({**params, "batch_stats": variables["batch_stats"]}, x, mask=mask, mutable=True)
        total = jnp.sum(jnp.where(mask, jnp.sin(out), 0))
        return total if axis_name is None else jax.lax.psum(total, axis_name)

    dx, dscale = jax.grad(loss, argnums=(0, 1))(x, variables["params"]["scale"])
    return {
        "y": y,
        "mean": state.mean,
        "var": state.var,
        "linen_y": linen_y,
        "linen_mean": updates["batch_stats"]["mean"],
        "linen_var": updates["batch_stats"]["var"],
        "dx": dx,
        "dscale": dscale,
    }


PER_ROW = ("y", "linen_y", "dx")  # the results with one row per input row; the others are per feature


def check_batch_norm(process_id: int, processes: int, out: pathlib.Path):
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    x, valid = batch_rows(process_id)
    global_x, global_valid = (jax.make_array_from_process_local_data(sharding, a) for a in (x, valid))
    out_specs = {
        name: P("data") if name in PER_ROW else P()
        for name in ("y", "mean", "var", "linen_y", "linen_mean", "linen_var", "dx", "dscale")
    }
    fn = jax.jit(
        jax.shard_map(
            lambda x, valid: batch_norm_results(x, valid, axis_name="data"),
            mesh=mesh,
            in_specs=(P("data"), P("data")),
            out_specs=out_specs,
        )
    )
    results = fn(global_x, global_valid)
    local = {
        name: np.concatenate([np.asarray(shard.data) for shard in value.addressable_shards])
        if name in PER_ROW
        else np.asarray(value)
        for name, value in results.items()
    }
    np.savez(out / f"statistics{process_id}.npz", **local)
    print(f"process {process_id}: batch norm over the valid rows of {processes} processes computed")


def train_data_parallel(process_id: int, args, out: pathlib.Path):
    import jax
    import multi_device
    import train_loop

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    train_split, test_split = train_loop.digits(args.seed)
    params, state, accuracy = multi_device.train(train_split, test_split, args, mesh)
    leaves = {f"param{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(params))}
    leaves |= {f"state{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(state))}
    np.savez(out / f"trained{process_id}.npz", accuracy=accuracy, **leaves)
    print(f"process {process_id}: trained on {mesh.size} devices in {jax.process_count()} processes")


def worker(args):
    out = pathlib.Path(args.out)
    initialize(args.coordinator, args.processes, args.process_id, args.init_timeout)
    if args.crash_process == args.process_id:
        os._exit(3)  # fault injection (--crash-process): the others are left waiting in a collective
    check_batch_norm(args.process_id, args.processes, out)
    if args.epochs > 0:
        train_data_parallel(args.process_id, args, out)


# ---- the launcher's checks ---------------------------------------------------------------------------------------


def compare(processes: int, args, out: pathlib.Path) -> dict:
    """Checks the workers' results against one process; returns the largest differences it found."""
    import jax.numpy as jnp

    rows = [batch_rows(i) for i in range(processes)]
    valid_x = np.concatenate([x[valid] for x, valid in rows])
    expected = batch_norm_results(jnp.asarray(valid_x), jnp.ones(len(valid_x), bool))
    results = [np.load(out / f"statistics{i}.npz") for i in range(processes)]
    report = {}
    for name, value in expected.items():
        if name in PER_ROW:
            got = np.concatenate([r[name][valid] for r, (_, valid) in zip(results, rows, strict=True)])
            report[name] = float(np.abs(got - np.asarray(value)).max())
        else:
            report[name] = max(float(np.abs(r[name] - np.asarray(value)).max()) for r in results)
    report["padding_dx"] = max(
        float(np.abs(r["dx"][~valid]).max(initial=0)) for r, (_, valid) in zip(results, rows, strict=True)
    )
    print(
        f"1. {len(valid_x)} valid rows on {processes} processes: max |difference| from one process over jbn.batch_norm "
        f"and jbn.linen.BatchNorm outputs, running statistics and gradients: {np.max(list(report.values())):.2e}"
    )
    if args.epochs > 0:
        report |= compare_training(processes, args, out)
    return report


def compare_training(processes: int, args, out: pathlib.Path) -> dict:
    import jax
    import multi_device
    import train_loop

    trained = [dict(np.load(out / f"trained{i}.npz")) for i in range(processes)]
    identical = all(np.array_equal(trained[0][key], other[key]) for other in trained[1:] for key in trained[0])
    train_split, test_split = train_loop.digits(args.seed)
    params, state, accuracy = multi_device.train(train_split, test_split, args)
    single = [*jax.tree.leaves(params), *jax.tree.leaves(state)]
    ours = [trained[0][f"param{i}"] for i in range(len(jax.tree.leaves(params)))]
    ours += [trained[0][f"state{i}"] for i in range(len(jax.tree.leaves(state)))]
    difference = max(float(np.abs(a - np.asarray(b)).max()) for a, b in zip(ours, single, strict=True))
    print(
        f"2. data-parallel over {processes} processes x {LOCAL_DEVICES} devices: test accuracy "
        f"{float(trained[0]['accuracy']):.3f} (one process {accuracy:.3f}); parameters and running statistics "
        f"bit-identical in every process: {identical}; max |difference| from one process {difference:.2e}"
    )
    return {"identical_across_processes": identical, "param_difference": difference}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--process-id", type=int, default=None, help="run as this worker (one per host)")
    parser.add_argument("--coordinator", default=None, help="host:port of process 0 (workers only)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="cap the steps per epoch (smoke tests)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds before the launcher stops the workers")
    parser.add_argument("--init-timeout", type=int, default=60, help="seconds a worker waits for the coordinator")
    parser.add_argument("--out", default=None, help="where workers write their results")
    parser.add_argument("--crash-process", type=int, default=None, help="fault injection: this worker dies")
    args = parser.parse_args(argv)
    if args.process_id is not None:
        return worker(args)
    worker_args = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    worker_args += ["--init-timeout", str(args.init_timeout)]
    for flag, value in (("--max-steps", args.max_steps), ("--crash-process", args.crash_process)):
        if value is not None:
            worker_args += [flag, str(value)]
    with tempfile.TemporaryDirectory() as directory:
        out = pathlib.Path(args.out or directory)
        launch(worker_args, args.processes, args.timeout, out)
        return compare(args.processes, args, out)


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    main()
