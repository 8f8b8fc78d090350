"""Where a sweep's runs execute: here, one after another (``LocalExecutor``), or on a Ray
cluster, several at once (``RayExecutor``).

An executor only runs configurations and hands back what each gave (``Outcome``); the
sweep (zpruner.sweep.run_sweep) alone decides what is left to run and writes the results
file, so resume, ``--dry-run``, ``--adopt`` and ``zpruner report`` do not depend on it.
"""
from __future__ import annotations

import importlib.metadata
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .config import RunConfig
from .errors import ZprunerError

# What a Ray worker must see as the driver does: the hub's offline switches (a cluster
# without internet would otherwise retry the hub for minutes), the data folder and the
# converted-model cache (zpruner.data, zpruner.models).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
                 "HF_DATASETS_CACHE", "ZPRUNER_DATA_DIR", "ZPRUNER_CACHE", "LMEVAL_LOG_LEVEL")
RAY_MISSING = "--executor ray needs Ray, which is not installed: pip install 'zpruner[ray]'"


@dataclass
class Outcome:
    """What became of one configuration: its results, or why it has none."""

    config: RunConfig
    result: dict | None = None
    error: str | None = None  # set when the run failed
    seconds: float = 0.0
    skipped: bool = False  # another sweep on the same results file finished it meanwhile


class LocalExecutor:
    """The runs one after another in this process. Consecutive runs on one model share a
    ``Workspace`` (model loaded once, dense weights restored between runs), so the
    configurations should come grouped by model."""

    def map(self, configs: list[RunConfig], progress: bool,
            still_todo: Callable[[RunConfig], bool]) -> Iterator[Outcome]:
        from .runner import Workspace, run  # torch-heavy

        workspace = None
        for config in configs:
            if not still_todo(config):
                yield Outcome(config, skipped=True)
                continue
            if workspace is None or workspace.model_config != config.model:
                workspace = Workspace(config.model, config.data_dir, keep_dense=True)
            start = time.perf_counter()
            try:
                result = run(config, progress, workspace)
            except ZprunerError as exc:
                yield Outcome(config, error=str(exc), seconds=time.perf_counter() - start)
                continue
            yield Outcome(config, result, seconds=time.perf_counter() - start)


class SweepWorker:
    """One Ray actor: runs the configurations it is sent one after another in its own
    process, keeping a ``Workspace`` for the model of its last run, so a worker that stays
    on one model loads it, and builds its calibration and evaluation data, once."""

    def __init__(self, cwd: str, threads: int):
        # Relative paths in a grid (a model folder, --data-dir) mean what they meant on the
        # driver, wherever the shared filesystem has that folder.
        if os.path.isdir(cwd):
            os.chdir(cwd)
        import torch
        import transformers

        # Ray reserved `threads` cores for this worker; more threads would oversubscribe them.
        torch.set_num_threads(threads)
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.workspace = None

    def run(self, config: RunConfig) -> tuple[dict, float]:
        from .runner import Workspace, run

        if self.workspace is None or (self.workspace.model_config, self.workspace.data_dir) != (
                config.model, config.data_dir):
            self.workspace = Workspace(config.model, config.data_dir, keep_dense=True)
        start = time.perf_counter()
        # No progress bars: several workers drawing bars into the driver's terminal garble it.
        result = run(config, False, self.workspace)
        return result, time.perf_counter() - start


def executor_from_options(executor: str, ray_address: str | None, cpus_per_run: float | None,
                          gpus_per_run: float | None):
    """The executor the sweep's options ask for (None: local); checked (Ray installed) before
    anything is written."""
    if executor == "local":
        given = [name for name, value in (("ray_address", ray_address), ("cpus_per_run", cpus_per_run),
                                          ("gpus_per_run", gpus_per_run)) if value is not None]
        if given:
            raise ZprunerError(", ".join("--" + name.replace("_", "-") for name in given)
                               + ": options of --executor ray; add --executor ray or drop them")
        return None
    return RayExecutor(ray_address, cpus_per_run or 1, gpus_per_run)


def import_ray():
    try:
        import ray
    except ImportError:
        raise ZprunerError(RAY_MISSING) from None
    return ray


class RayExecutor:
    """The runs as tasks on a pool of ``SweepWorker`` actors, as many as the cluster holds at
    ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs each.

    ``address`` None starts a Ray instance on this machine for the sweep; 'auto' joins the
    cluster this machine belongs to; 'HOST:PORT' or 'ray://HOST:PORT' a given one. When
    this process is already connected (``ray.init`` called before), that connection is
    used. ``gpus_per_run`` None = 1 when the cluster has GPUs, else 0. A run that raises is
    reported with its error; a worker that dies is replaced and its run tried once more.
    """

    def __init__(self, address: str | None = None, cpus_per_run: float = 1, gpus_per_run: float | None = None,
                 worker: type = SweepWorker):
        self.ray = import_ray()
        if cpus_per_run <= 0 or (gpus_per_run is not None and gpus_per_run < 0):
            raise ZprunerError(f"--cpus-per-run {cpus_per_run} must be above 0 and --gpus-per-run "
                               f"{gpus_per_run} at least 0")
        self.address, self.cpus, self.gpus, self.worker = address, cpus_per_run, gpus_per_run, worker

    def _connect(self) -> bool:
        """Connect to Ray; True when this call started the instance (and so must stop it)."""
        if self.ray.is_initialized():
            return False
        local = self.address in (None, "local")
        try:
            if local:  # a sweep has no use for the dashboard
                self.ray.init(address="local", include_dashboard=False)
            else:  # an existing cluster keeps its own settings
                self.ray.init(address=self.address)
        except ConnectionError as exc:
            raise ZprunerError(f"--ray-address {self.address}: cannot connect to a Ray cluster ({exc}); "
                               "start one with 'ray start --head', or leave the option out to start Ray "
                               "on this machine") from None
        return local

    def _pool_size(self, gpus: float, todo: int) -> int:
        """Workers to start: as many runs as the cluster's resources hold at once, at most one
        per run. (Resources split across nodes may hold fewer: the extra workers then wait.)"""
        total = self.ray.cluster_resources()
        cpus, gpus_total = total.get("CPU", 0), total.get("GPU", 0)
        fits = min(math.floor(cpus / self.cpus), math.floor(gpus_total / gpus) if gpus else math.inf)
        if fits < 1:  # Ray would wait forever for resources that are not there
            raise ZprunerError(f"this Ray cluster ({cpus:g} CPUs, {gpus_total:g} GPUs) cannot hold a run of "
                               f"{self.cpus:g} CPUs and {gpus:g} GPUs; lower --cpus-per-run / --gpus-per-run")
        return min(fits, todo)

    def _worker_factory(self, gpus: float) -> Callable[[], object]:
        env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
        actor = self.ray.remote(self.worker).options(num_cpus=self.cpus, num_gpus=gpus,
                                                     runtime_env={"env_vars": env} if env else None)
        return lambda: actor.remote(os.getcwd(), max(1, math.floor(self.cpus)))

    def map(self, configs: list[RunConfig], progress: bool,
            still_todo: Callable[[RunConfig], bool]) -> Iterator[Outcome]:
        if not configs:  # nothing to run: no reason to start or join a cluster
            return
        ray = self.ray
        started_here = self._connect()
        try:
            gpus = self.gpus if self.gpus is not None else (1 if ray.cluster_resources().get("GPU", 0) else 0)
            yield from self._dispatch(list(configs), gpus, still_todo)
        finally:
            if started_here:
                ray.shutdown()

    def _dispatch(self, pending: list[RunConfig], gpus: float,
                  still_todo: Callable[[RunConfig], bool]) -> Iterator[Outcome]:
        ray = self.ray
        new_worker = self._worker_factory(gpus)
        # One slot per worker: [actor or None until needed, model of its last run]. A free
        # worker takes the next run on the model it holds, else the first one left, so each
        # worker loads few models.
        slots = [[None, None] for _ in range(self._pool_size(gpus, len(pending)))]
        running: dict = {}  # ObjectRef -> (slot index, config)
        deaths: dict[int, int] = {}  # id(config) -> workers that died running it
        try:
            while pending or running:
                busy = {index for index, _ in running.values()}
                for index, slot in enumerate(slots):
                    if index in busy or not pending:
                        continue
                    pick = next((c for c in pending if c.model == slot[1]), pending[0])
                    pending.remove(pick)
                    if not still_todo(pick):
                        yield Outcome(pick, skipped=True)
                        continue
                    if slot[0] is None:
                        slot[0] = new_worker()
                    slot[1] = pick.model
                    running[slot[0].run.remote(pick)] = (index, pick)
                if not running:
                    continue
                [ref], _ = ray.wait(list(running), num_returns=1)
                index, config = running.pop(ref)
                try:
                    result, seconds = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # the run raised: report it; the worker is fine
                    cause = exc.cause
                    yield Outcome(config, error=str(cause) if isinstance(cause, ZprunerError)
                                  else f"{type(cause).__name__}: {cause}")
                    continue
                except ray.exceptions.RayActorError as exc:  # the worker died (OOM killer, lost node, crash)
                    if getattr(exc, "actor_init_failed", False):  # it never started: so will none on that node
                        detail = [line.strip() for line in str(exc).splitlines() if line.strip()][-1]
                        raise ZprunerError(f"a Ray worker could not start ({detail}); every node needs zpruner "
                                           f"{importlib.metadata.version('zpruner')} installed in the environment Ray runs") from None
                    ray.kill(slots[index][0])
                    slots[index] = [None, None]  # a new one when there is work for it
                    deaths[id(config)] = deaths.get(id(config), 0) + 1
                    if deaths[id(config)] < 2:
                        pending.insert(0, config)
                    else:
                        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
                        yield Outcome(config, error=f"its Ray worker died twice ({reason})")
                    continue
                yield Outcome(config, result, seconds=seconds)
        finally:  # free the cluster's resources now, also when the sweep is interrupted
            for actor, _ in slots:
                if actor is not None:
                    ray.kill(actor)
