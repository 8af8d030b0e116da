"""Where the ingest's independent units run: here, one after another (`SerialExecutor`), or as Ray tasks on a
cluster (`RayExecutor`). One interface for every kind of unit (token edges, pullbacks, OV heads, statistics shards,
prompt graphs): `map(fn, items)`.

A unit is a module-level function `fn(worker, item)` that yields its results, and a small picklable `item` (layers,
paths, settings): never the model or the transcoders. The serial executor calls it with the model already loaded
here; a Ray task calls it in a worker process that loaded the model and transcoders once, from the same names and
paths the CLI got (`LoadSpec`), on its own device, and keeps them for the next unit of the run (`_loaded`). A unit
that writes catalog parts writes each whole (`catalog.atomic`) into the catalog directory, which every worker must
see at the same path (shared storage), and yields (part, rows); the driver alone records them and writes the
manifest, so a run killed anywhere resumes as a serial one does.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from circuit_catalog.errors import ExecutorError, UserError, first_line
from circuit_catalog.ingest.device import task_device

EXECUTORS = ("serial", "ray")
RAY_EXTRA = "pip install 'circuit-catalog[ray]'"
MAX_RETRIES = 3  # a task whose worker process dies (killed, out of memory, node lost) runs again, this often at most


@dataclass(frozen=True)
class LoadSpec:
    """What a worker loads: the model and transcoders as the CLI names them (`pipeline.load`'s arguments)."""

    model: str
    transcoders: str
    layers: tuple[int, ...] | None = None
    trust_pickle: bool = False
    device: str | None = None
    dtype: str | None = None

    @classmethod
    def of(cls, model, transcoders, layers=None, trust_pickle: bool = False, device: str | None = None,
           dtype: str | None = None) -> LoadSpec:
        """A spec from the API's arguments; local paths made absolute (a worker's working directory is its own)."""
        if not isinstance(model, (str, Path)) or not isinstance(transcoders, (str, Path)):
            raise ExecutorError("--executor ray loads the model on each worker from its name or path: pass the model and "
                                "transcoders as names or paths, not as objects loaded in this process")
        return cls(_absolute(model), _absolute(transcoders), None if layers is None else tuple(layers), trust_pickle,
                   device, None if dtype is None else str(dtype).removeprefix("torch."))


def _absolute(spec: str | Path) -> str:
    return str(Path(spec).resolve()) if Path(spec).exists() else str(spec)


@dataclass
class Worker:
    """What a unit runs with: a model and its transcoders, bound to it."""

    model: Any
    tset: Any


class Executor(Protocol):
    parallelism: int  # units that run at once: how finely to split work that can be split (layer groups)
    device: str  # where the units compute ("cpu", "cuda"): what the manifest records and "auto" settings resolve for
    in_process: bool  # units run in this process (they may show progress bars; no worker can die mid-write)

    def map(self, fn: Callable[[Worker, Any], Iterable], items: Iterable) -> Iterator:
        """Every result of `fn(worker, item)` for each item; a unit's results in its order, units as they finish."""

    def close(self) -> None: ...


class SerialExecutor:
    """Each unit in this process, in order, with the model loaded here: the ingest as it always ran."""

    parallelism, in_process = 1, True

    def __init__(self, model, tset):
        self.worker = Worker(model, tset)
        self.device = str(model.W_E.device)

    def map(self, fn, items):
        for item in items:
            yield from fn(self.worker, item)

    def close(self) -> None:
        pass


class RayExecutor:
    """Each unit a Ray task; one GPU per task where the cluster has GPUs (and the device asks for them).

    `address`: None starts a local cluster (stopped by `close`); "auto", "HOST:PORT" (a node of the cluster, after
    `ray start`) or "ray://HOST:10001" (Ray Client, from anywhere) joins one. A process already connected (a
    notebook's `ray.init`) is used as it is. A task whose worker dies is retried (`MAX_RETRIES`); a Python
    exception in a task is not (it would fail again) and is raised here, a user error as itself.
    """

    in_process = False

    def __init__(self, spec: LoadSpec, address: str | None = None, cpus_per_task: int = 1):
        ray = import_ray()
        self._ray, self._started = ray, False
        _check_reachable(address)
        if ray.is_initialized():
            _check_same_cluster(ray, address)
        else:
            _connect(ray, address)
            self._started = True
        resources = ray.cluster_resources()
        try:
            device, use_gpu = task_device(spec.device, int(resources.get("GPU", 0)))
        except UserError:
            self.close()
            raise
        self.spec, self.device = replace(spec, device=device), device
        self.parallelism = int(resources["GPU"]) if use_gpu else max(1, int(resources.get("CPU", 1)) // cpus_per_task)
        # max_calls=0: a worker keeps its loaded model for every unit of the run (Ray's default for GPU tasks is a
        # fresh process per task, which would load the model each time)
        self._task = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=cpus_per_task, max_retries=MAX_RETRIES,
                                retry_exceptions=False, max_calls=0)(_run)

    def map(self, fn, items):
        ray = self._ray
        pending = [self._task.remote(self.spec, fn, item) for item in items]
        try:
            while pending:
                (done,), pending = ray.wait(pending, num_returns=1)
                yield from self._result(done, fn)
        finally:  # the driver stopped early (an error, a closed generator): the rest is not wanted
            for ref in pending:
                ray.cancel(ref)

    def _result(self, ref, fn) -> list:
        from ray import exceptions

        try:
            return self._ray.get(ref)
        except exceptions.RayTaskError as exc:
            if isinstance(exc.cause, UserError):
                raise exc.cause from None
            raise
        except (exceptions.WorkerCrashedError, exceptions.NodeDiedError, exceptions.OutOfMemoryError,
                exceptions.ObjectLostError) as exc:
            raise ExecutorError(f"a Ray worker died running {fn.__name__} {MAX_RETRIES + 1} times "
                                f"({type(exc).__name__}: {first_line(exc)[:200]})") from None

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


def import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorError(f"--executor ray needs Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


def _check_reachable(address: str | None) -> None:
    """An address that does not answer is one error, at once (Ray itself waits minutes for a GCS that never answers)."""
    if address in (None, "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except ValueError:
        raise ExecutorError(f"--address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT") from None
    except OSError as exc:
        raise ExecutorError(f"cannot reach the Ray cluster at {address} ({exc.strerror or type(exc).__name__})") from None


def _check_same_cluster(ray, address: str | None) -> None:
    """This process is connected already (a notebook's or a test's `ray.init`): used as it is, unless `address` names
    another cluster."""
    if address in (None, "auto"):
        return
    try:
        current = ray.get_runtime_context().gcs_address
    except Exception:  # a Ray Client connection has no GCS address here
        current = None
    if current != address:
        raise ExecutorError(f"this process is connected to the Ray cluster at {current or 'another address'}, not {address}: "
                            "leave out --address, or call ray.shutdown() first")


def _connect(ray, address: str | None) -> None:
    """Start a local cluster (None) or join `address`."""
    try:
        ray.init(address=address, include_dashboard=False if address is None else None, log_to_driver=False,
                 configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
        raise ExecutorError(f"cannot connect to the Ray cluster at {address}: {first_line(exc)[:200]}") from None


_LOADED: dict[LoadSpec, Worker] = {}  # in a worker process: the model and transcoders of the run it serves


def _loaded(spec: LoadSpec) -> Worker:
    if spec not in _LOADED:
        from circuit_catalog.ingest.pipeline import load

        _LOADED.clear()  # one model per process: a worker serves one run at a time
        model, tset = load(spec.model, spec.transcoders, None if spec.layers is None else list(spec.layers), spec.trust_pickle,
                           spec.device, spec.dtype)
        _LOADED[spec] = Worker(model, tset)
    return _LOADED[spec]


def _run(spec: LoadSpec, fn, item) -> list:
    """A Ray task: `fn`'s results on this worker's copy of the model."""
    return list(fn(_loaded(spec), item))


def run_unit(worker: Worker, unit) -> Iterable:
    """The `fn` for units that are callables of a worker (`ingest.job`'s and `ingest.prompts`' unit classes)."""
    return unit(worker)


def groups(items: list, n: int) -> list[list]:
    """`items` in at most `n` contiguous groups of near-equal size, none empty (n <= 1: one group)."""
    n = max(1, min(n, len(items)))
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        stop = start + size + (i < extra)
        out.append(items[start:stop])
        start = stop
    return [g for g in out if g]
