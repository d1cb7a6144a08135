"""The Ray backend of ``detox-tui sweep``: one SweepWorker actor per GPU (or per ``cpus_per_worker`` CPUs), work
handed out as actors free up, a lost actor replaced and its experiment retried once.

Ray is an optional extra (``pip install 'detox-tui[ray]'``); this module imports it only when a sweep starts.
The actors load their model once, run experiments from its original weights and hand back plain data; the driver
(``sweep.run_sweep``) is the only process that writes the run store. A model's shared inputs (the before phase and
the covariance for the union of its experiments' layers) are computed once by one actor and passed to the others
through Ray's object store, so no shared file system is needed for them.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from detox_tui.errors import Cancelled, UserError
from detox_tui.pipeline.sweep import MAX_ATTEMPTS, Outcome, Prepared, SweepWorker

log = logging.getLogger(__name__)


class _RayWorker(SweepWorker):
    """SweepWorker as a Ray actor: ``prepare_parts`` returns the errors and the shared inputs as two objects, so
    the driver fetches only the (small) errors and hands the shared inputs to the other actors by reference."""

    def prepare_parts(self, *args: Any) -> tuple[dict[str, str], Any]:
        prepared = self.prepare(*args)
        return prepared.errors, prepared.shared


def _lost(ray) -> tuple[type, ...]:
    """Ray's errors for a worker that went away (killed, crashed, out of memory, its node lost), not a failed call."""
    ex = ray.exceptions
    names = ("RayActorError", "OutOfMemoryError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError")
    return tuple(getattr(ex, n) for n in names if hasattr(ex, n))


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise UserError("--backend ray needs Ray: pip install 'detox-tui[ray]'.") from exc
    return ray


class RayBackend:
    """Runs a sweep's experiments on Ray actors; ``address`` None starts a local Ray instance (shut down at the end)."""

    name = "ray"

    def __init__(
        self,
        *,
        address: str | None = None,
        workers: int | None = None,
        cpus_per_worker: int = 1,
        data_dir: str | None = None,
        verify: bool = False,
        log_message: Callable[[str], None] = lambda message: None,
    ):
        if cpus_per_worker < 1:
            raise UserError(f"--cpus-per-worker must be at least 1, not {cpus_per_worker}.")
        if workers is not None and workers < 1:
            raise UserError(f"--workers must be at least 1, not {workers}.")
        self.address = address
        self.max_workers = workers
        self.cpus_per_worker = int(cpus_per_worker)
        self.data_dir = data_dir
        self.verify = verify
        self.log_message = log_message
        self.cancel = threading.Event()
        self.actors: dict[str, Any] = {}
        self._owns_ray = False
        self._actor_class: Any = None  # _RayWorker as a Ray actor class with this sweep's resources
        self._count = 0

    # ------------------------------------------------------------------------------------ actors

    def start(self, n_experiments: int) -> None:
        ray = _ray()
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": logging.ERROR,
            }
            try:
                if self.address:
                    ray.init(address=self.address, **kwargs)
                else:
                    ray.init(**kwargs)
            except Exception as exc:  # noqa: BLE001 - Ray's many connection errors: one sentence
                where = f"the Ray cluster at '{self.address}'" if self.address else "a local Ray instance"
                raise UserError(f"Could not start or reach {where}: {str(exc).splitlines()[0]}.") from exc
            self._owns_ray = True
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = int(resources.get("CPU", 1))
        # One actor per GPU; without GPUs one per cpus_per_worker CPUs.
        capacity = gpus if gpus else max(1, cpus // self.cpus_per_worker)
        self._actor_class = ray.remote(num_gpus=1 if gpus else 0, num_cpus=self.cpus_per_worker)(_RayWorker)
        n = max(1, min(capacity, self.max_workers or capacity, max(1, n_experiments)))
        self.log_message(
            f"ray: {n} worker{'s' if n != 1 else ''} "
            + (f"(1 GPU each, of {gpus})" if gpus else f"({self.cpus_per_worker} CPU each, of {cpus})")
        )
        for _ in range(n):
            self._new_actor()

    def _new_actor(self) -> str:
        name = f"ray:{self._count}"
        self._count += 1
        self.actors[name] = self._actor_class.remote(name, self.data_dir, self.cpus_per_worker, self.verify)
        return name

    def _replace(self, name: str) -> str:
        self.actors.pop(name, None)
        new = self._new_actor()
        self.log_message(f"{name} was lost; started {new} in its place")
        return new

    def stop(self) -> None:
        self.cancel.set()
        ray = _ray()
        # Idle actors remove their scratch folders; a busy one (a cancel mid-experiment) is killed after a moment.
        try:
            closing = [actor.close.remote() for actor in self.actors.values()]
            if closing:
                ray.wait(closing, num_returns=len(closing), timeout=5)
        except Exception:  # noqa: BLE001 - already gone
            pass
        for actor in self.actors.values():
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors.clear()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

    # ------------------------------------------------------------------------------------ work

    def prepare(self, base, experiments, model_path, items, holdout) -> Prepared:
        """The model's shared inputs, computed by one actor (retried once on another if it is lost)."""
        ray = _ray()
        last: Exception | None = None
        for _ in range(MAX_ATTEMPTS):
            name = next(iter(self.actors))
            errors_ref, shared_ref = (
                self.actors[name]
                .prepare_parts.options(num_returns=2)
                .remote(base, experiments, model_path, items, holdout)
            )
            try:
                errors = self._get(errors_ref)
                return Prepared(shared_ref, errors)
            except _lost(ray) as exc:
                last = exc
                self._replace(name)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                if isinstance(cause, UserError):
                    raise UserError(str(cause)) from exc
                raise RuntimeError(f"{type(cause).__name__}: {cause}") from exc
        raise UserError(f"The workers preparing '{model_path}' were lost twice: {str(last).splitlines()[0]}.")

    def _get(self, ref: Any) -> Any:
        """ray.get that stays responsive to a cancel."""
        ray = _ray()
        while True:
            ready, _ = ray.wait([ref], timeout=0.5)
            if ready:
                return ray.get(ready[0])
            if self.cancel.is_set():
                raise Cancelled("cancelled")

    def run(self, base, experiments, model_path, items, holdout, prepared, on_start) -> Iterator[Outcome]:
        """Hand experiments to actors as they free up; yield each outcome as it arrives."""
        ray = _ray()
        queue = deque(experiments)
        attempts: dict[str, int] = {}
        inflight: dict[Any, tuple[Any, str]] = {}
        idle = list(self.actors)
        while queue or inflight:
            while queue and idle:
                name = idle.pop(0)
                if name not in self.actors:
                    continue
                exp = queue.popleft()
                attempts[exp.id] = attempts.get(exp.id, 0) + 1
                ref = self.actors[name].run.remote(base, exp, model_path, items, holdout, prepared.shared)
                inflight[ref] = (exp, name)
                on_start(exp, name, attempts[exp.id])
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
            if self.cancel.is_set():
                raise Cancelled("cancelled")
            for ref in ready:
                exp, name = inflight.pop(ref)
                try:
                    out = ray.get(ref)
                except _lost(ray) as exc:
                    idle.append(self._replace(name))
                    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    if attempts[exp.id] < MAX_ATTEMPTS:
                        self.log_message(f"{exp.id}: its worker {name} was lost; running it again")
                        queue.appendleft(exp)
                    else:
                        yield Outcome(
                            exp.id,
                            name,
                            0.0,
                            error=f"its worker was lost {attempts[exp.id]} times ({reason})",
                        )
                    continue
                except ray.exceptions.RayTaskError as exc:
                    idle.append(name)
                    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                    yield Outcome(exp.id, name, 0.0, error=f"{type(cause).__name__}: {cause}")
                    continue
                idle.append(name)
                yield out
