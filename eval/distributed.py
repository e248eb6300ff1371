"""`cli.py sweep` and `cli.py sensitivity` across GPUs and hosts (`--workers N`, `--ray ADDRESS`), with Ray.

Ray is imported here only, and this module only under those flags: without them the verbs run in one process as
before (`device_and_workers` returns None and imports nothing).

Each row (sweep) or variant (sensitivity) is one Ray task, run by one of at most N long-lived workers (Ray actors;
`--workers N`, without it one per GPU, or CPU, of the cluster). On CUDA a worker holds a whole GPU for its life
(`num_gpus=1`) and runs one task at a time, so a row is built, evaluated and timed with no other row on its GPU; on
the CPU a worker holds one CPU. Why actors and not plain tasks: Ray gives every GPU task a fresh process (so the GPU
it is given is the one torch sees), and starting it, importing torch, setting up CUDA and loading the inputs again
cost more per row than a small model's whole row. A worker process loads the inputs once, keeps them for the tasks
it runs next, and returns its cached GPU memory after each. Every node must see the same paths (a shared
filesystem): the model, the SQuAD files, the report folder and the workbench cache, which is how work is shared
rather than redone. Before any row runs the driver featurizes the evaluation questions into the feature cache and
has each calibration the rows need made once, by one task, into the calibration cache; on CUDA the first row of
each kind (precision, INT8 or not, sparse) runs before the others of its kind, so its kernel timings are in the
timing cache (`engines.tuning.TimingCache` merges concurrent saves) before they build.

Who stores a row: the driver, with the sweep's own `store_row` (atomic), as each result arrives. One writer per
file; the driver alone computes the keys a rerun compares (with the device that worker reports, so a row is never
stored under another GPU's key); and a worker that dies mid-row has written nothing but its engine and
predictions, which the next attempt checks before reusing. Ray ends a driver's workers with it, so a killed driver
loses only the rows in flight; finished rows are on disk and a rerun reuses them, as it does in one process.

Failures: a task that raises, or whose worker dies (a new worker takes the dead one's place), is submitted once
more; when that fails too the row is reported as failed (the table lists the rows that finished, the report names
the failed ones and why) and a rerun tries it again. A failed sensitivity variant ends the analysis with one line
(its numbers cannot be left out of the suggestion); the measured variants are stored in REPORT_DIR/variants/ and a
rerun measures only the rest.

Timing: on CUDA each row is timed on its own GPU and records which (host, GPU index and uuid: `timed_on` in its
row file); a report whose rows were timed on different GPU models says so in a warning. The end-of-sweep drift
check (eval.sweep) watches one machine over a run and is not run across GPUs. CPU workers run side by side, so
their timings are not comparable: they are stored as not stable, and the driver times the rows again one at a
time at the end, then runs the drift check as a single-process sweep does.

Progress: a line per finished or failed task, then each worker's rows done, running and failed (a task leaves a
marker naming its worker in REPORT_DIR/.workers/ while it runs).

Test hook: WORKBENCH_TEST_FAIL="ROW:exit:K,ROW2:raise:K" (read by the driver) makes the first K attempts of that
row's task end its worker process (os._exit) or raise, after the row's work and before it returns.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from common.errors import WorkbenchError

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
FAIL_ENV = "WORKBENCH_TEST_FAIL"
INSTALL = "pip install 'ray==2.60.*'"


# ------------------------------------------------------------------------------------------------ the cluster

@dataclass(frozen=True)
class Workers:
    """--workers N (at most N tasks at once; None: one per GPU, or CPU, of the cluster) and --ray ADDRESS (None:
    a Ray started here, on this host)."""

    count: int | None = None
    address: str | None = None

    def limit(self, device: torch.device) -> int:
        """Tasks at once: N, else the cluster's GPUs (CUDA) or CPUs."""
        if self.count is not None:
            return self.count
        resources = import_ray().cluster_resources()
        return max(1, int(resources.get("GPU" if device.type == "cuda" else "CPU", 1)))


def import_ray():
    try:
        import ray
    except ImportError:
        raise WorkbenchError(f"--workers/--ray need Ray, which is not installed here: {INSTALL}") from None
    return ray


def connect(workers: Workers, *, num_cpus: int | None = None, num_gpus: int | None = None) -> dict:
    """Join the cluster at workers.address, or start a local Ray (`num_cpus`, `num_gpus`: its resources; None:
    what Ray finds); nothing when Ray is already up in this process. Workers import the workbench from this
    checkout (PYTHONPATH), which every node must see at the same path. Returns the cluster's resources."""
    ray = import_ray()
    if not ray.is_initialized():
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        common = dict(runtime_env={"env_vars": {"PYTHONPATH": path}}, logging_level=logging.ERROR)
        if not sys.stdout.isatty():  # a log file: the workers' lines without Ray's colour codes
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        try:
            if workers.address:
                ray.init(address=workers.address, **common)
            else:
                ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **common)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"--ray {workers.address}" if workers.address else "--workers"
            raise WorkbenchError(f"{where}: cannot start or join Ray ({_first_line(e)})") from None
        _stop_on_sigterm()
    return ray.cluster_resources()


def _stop_on_sigterm() -> None:
    """SIGTERM (a scheduler's time limit, `kill`) ends the run as Ctrl-C does: the rows in flight are lost, the
    finished ones stay stored, and the sweep says how to resume. Set after ray.init, in place of the handler Ray
    gives its driver, which prints a native stack trace and a page of log lines."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def device_and_workers(flags) -> tuple[torch.device, Workers | None]:
    """The device rows run on and the workers (None: this process, Ray not imported) from --device, --workers and
    --ray. With --ray the device is the cluster's (CUDA when it has GPUs), not this host's: the driver need not
    have a GPU."""
    import torch

    from model.runner import pick_device

    count, address = getattr(flags, "workers", None), getattr(flags, "ray", None)
    if count is None and address is None:
        return pick_device(flags.device), None
    if count is not None and count < 1:
        raise WorkbenchError(f"--workers must be at least 1, got {count}")
    workers = Workers(count, address)
    if address is None:
        device = pick_device(flags.device)
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        if count is not None and device.type == "cuda" and count > gpus:
            raise WorkbenchError(f"--workers {count}: this host has {gpus} CUDA GPU(s) (one row per GPU at a time)")
        connect(workers, num_cpus=None if device.type == "cuda" else max(count or 1, os.cpu_count() or 1),
                num_gpus=gpus)
        return device, workers
    gpus = int(connect(workers).get("GPU", 0))
    if flags.device == "cuda" and not gpus:
        raise WorkbenchError(f"--device cuda: the Ray cluster at {address} has no GPU")
    device = torch.device(flags.device or ("cuda" if gpus else "cpu"))
    if count is not None and device.type == "cuda" and count > gpus:
        raise WorkbenchError(f"--workers {count}: the Ray cluster at {address} has {gpus} GPU(s)")
    return device, workers


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _reason(e: BaseException) -> str:
    """Why a task failed, in one line: the exception it raised, or that its worker died."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {_first_line(cause)}"
    return f"{type(e).__name__}: {_first_line(e)}"


# ------------------------------------------------------------------------------------------------ a worker

@dataclass(frozen=True)
class WorkerInfo:
    """Where a task ran: `description` is what a row's accuracy depends on of the device (eval.sweep
    device_description), `machine` what its latency depends on (eval.measure.machine_key)."""

    label: str                       # "host GPU 3", "host pid 1234": progress lines and failures name it
    host: str
    gpu_index: int | None            # Ray's GPU id on its node (the task's cuda:0)
    gpu_uuid: str | None
    description: dict
    machine: dict

    def timed_on(self) -> dict:
        """What a row file records of the worker that timed it."""
        model = self.machine.get("gpu") or self.machine.get("cpu")
        return {"worker": self.label, "host": self.host, "gpu_index": self.gpu_index, "gpu_uuid": self.gpu_uuid,
                "model": model}


def this_worker(device: torch.device, driver: bool = False) -> WorkerInfo:
    """The process this runs in, as a WorkerInfo (`driver`: the driver process, not a Ray worker)."""
    from eval.measure import machine_key
    from eval.sweep import device_description

    host = socket.gethostname()
    index = uuid_ = None
    if device.type == "cuda":
        import torch

        ids = import_ray().get_gpu_ids() if not driver else []
        index = int(ids[0]) if ids else torch.cuda.current_device()
        uuid_ = str(getattr(torch.cuda.get_device_properties(0), "uuid", "")) or None
        label = f"{host} GPU {index}"
    else:
        label = f"{host} {'driver' if driver else 'pid'} {os.getpid()}"
    return WorkerInfo(label, host, index, uuid_, device_description(device), machine_key(device))


_SAID: list[str] = []        # a task's progress lines (eval.sweep's cfg.say), returned with its result
_STATE: dict[str, Any] = {}  # one job's inputs, loaded once per worker process


def _say(line: str) -> None:
    _SAID.append(line)


def _job_state(token: str, load: Callable[[], Any]) -> Any:
    if token not in _STATE:
        _STATE.clear()  # another job's inputs: let them go
        _STATE[token] = load()
    return _STATE[token]


@dataclass(frozen=True)
class _Job:
    """What every task of one run gets: the config as workers run it (quiet, no progress bars, not distributed),
    the driver's workbench cache folder (calibrations, features, kernel timings), a token naming the inputs a
    worker process keeps, and the folder where a task says which worker runs it (None: nowhere)."""

    cfg: Any
    cache_dir: str
    token: str
    marks: str | None


def _enter(job: _Job, name: str) -> WorkerInfo:
    """A task's start: the driver's cache folder, its lines collected afresh, its marker written."""
    from common.files import CACHE_ENV, atomic_write_json

    os.environ[CACHE_ENV] = job.cache_dir
    _SAID.clear()
    worker = this_worker(job.cfg.device)
    if job.marks:
        atomic_write_json(Path(job.marks) / f"{_file_name(name)}.json", {"worker": worker.label})
    return worker


def _fail_if_asked(fail: str | None) -> None:
    """The test hook (WORKBENCH_TEST_FAIL): end this worker, or raise, once the task's work is done."""
    if fail == "exit":
        sys.stderr.flush()
        os._exit(3)
    if fail == "raise":
        raise RuntimeError(f"failure asked for by {FAIL_ENV}")


def _file_name(name: str) -> str:
    return name.replace(":", "_").replace("/", "_")


def _failures_asked() -> dict[str, tuple[str, int]]:
    """WORKBENCH_TEST_FAIL="ROW:exit:1,ROW2:raise:2" -> {ROW: ("exit", 1), ROW2: ("raise", 2)}."""
    out = {}
    for part in filter(None, (p.strip() for p in os.environ.get(FAIL_ENV, "").split(","))):
        name, how, times = part.rsplit(":", 2)
        if how not in ("exit", "raise"):
            raise WorkbenchError(f"{FAIL_ENV}: {part!r}: use ROW:exit:TIMES or ROW:raise:TIMES")
        out[name] = (how, int(times))
    return out


# ------------------------------------------------------------------------------------------------ the pool

@dataclass
class Task:
    """One unit of work: `fn(*args, fail)` in a worker (`fn`: a module-level function, which the worker imports by
    name; `fail`: the test hook's word for this attempt, or None); a task with `after` waits until that task has
    finished."""

    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    after: str | None = None


class _Worker:
    """A long-lived Ray worker process (an actor; the module doc says why): runs tasks one at a time, and after
    each empties torch's cache of the GPU memory the task's engine used, so that a worker does not hold, between
    tasks, memory that no tensor uses. Its warnings read as the CLI's (`warning: ...`; Ray shows them on the
    driver, prefixed with the worker's pid)."""

    def __init__(self) -> None:
        from common.errors import warnings_to_stderr

        warnings_to_stderr()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        finally:
            _release_gpu_memory()


def _release_gpu_memory() -> None:
    """The rows already drop their engines and release (eval.measure.release); this covers the tasks that do not
    (a calibration, a task that raised). No gc.collect: it would walk every object the worker keeps (the featurized
    questions) after each row, and a raised task's frames are still referenced by its exception here."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@dataclass
class _Pool:
    """The workers of one Ray session and device kind, made as runs ask for them and kept between runs of this
    driver (a sweep's calibrations then rows; sensitivity's variants then its suggestion's builds)."""

    gpu: bool
    workers: list = field(default_factory=list)

    def take(self, n: int) -> list:
        """The first `n` workers, started where fewer exist."""
        while len(self.workers) < n:
            self.workers.append(self._start())
        return self.workers[:n]

    def replace(self, dead: Any) -> Any:
        """A new worker in place of `dead` (ended for good, should it linger)."""
        ray = import_ray()
        try:
            ray.kill(dead, no_restart=True)
        except (ray.exceptions.RayError, ValueError):
            pass
        fresh = self._start()
        self.workers[self.workers.index(dead)] = fresh
        return fresh

    def _start(self) -> Any:
        opts = dict(num_gpus=1 if self.gpu else 0, num_cpus=1, max_restarts=0, max_task_retries=0)
        return import_ray().remote(**opts)(_Worker).remote()


_POOLS: dict[tuple[str, bool], _Pool] = {}


def _pool(device: torch.device) -> _Pool:
    """This driver's workers for `device` in the current Ray session (a new session, new workers)."""
    ctx = import_ray().get_runtime_context()
    session, gpu = f"{ctx.get_session_name()}/{ctx.get_job_id()}", device.type == "cuda"
    if any(s != session for s, _ in _POOLS):  # an earlier session's workers ended with it
        _POOLS.clear()
    if (session, gpu) not in _POOLS:
        _POOLS[session, gpu] = _Pool(gpu)
    return _POOLS[session, gpu]


@dataclass
class _Board:
    """Done, failed and running per worker, for the progress lines."""

    marks: Path | None
    done: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)

    def worker_of(self, name: str) -> str | None:
        """The worker running task `name`, from its marker (None: not started yet, or no marker folder)."""
        from common.files import read_json

        path = self.marks / f"{_file_name(name)}.json" if self.marks else None
        try:
            return read_json(path, "worker marker")["worker"] if path and path.exists() else None
        except (WorkbenchError, KeyError, TypeError):
            return None

    def finished(self, name: str, worker: str | None, ok: bool) -> None:
        worker = worker or self.worker_of(name) or "a worker"
        counts = self.done if ok else self.failed
        counts[worker] = counts.get(worker, 0) + 1
        if self.marks:
            (self.marks / f"{_file_name(name)}.json").unlink(missing_ok=True)

    def line(self, running: Sequence[str], waiting: int) -> str:
        where: dict[str | None, list[str]] = {}
        for name in running:
            where.setdefault(self.worker_of(name), []).append(name)
        workers = sorted(set(self.done) | set(self.failed) | {w for w in where if w is not None})
        parts = [f"{w}: {self.done.get(w, 0)} done, {len(where.get(w, []))} running"
                 + (f" ({', '.join(where[w])})" if where.get(w) else "")
                 + (f", {self.failed[w]} failed" if self.failed.get(w) else "") for w in workers]
        if where.get(None):
            parts.append(f"starting: {', '.join(where[None])}")
        return "  workers: " + "; ".join(parts) + (f"; {waiting} waiting" if waiting else "")


def run_tasks(tasks: Sequence[Task], device: torch.device, limit: int, on_result: Callable[[str, Any], str],
              say: Callable[[str], None], marks: Path | None = None, what: str = "row") -> dict[str, str]:
    """Run `tasks` on at most `limit` workers for `device`, one task per worker at a time, in order (a task waits
    for its `after`). Each result goes to `on_result(name, value)` as it arrives (it stores it and returns the
    progress line). A task that fails is submitted once more (a dead worker replaced first); the failures of
    second attempts are returned (name -> why)."""
    ray = import_ray()
    asked = _failures_asked()
    pool = _pool(device)
    board, total, idle = _Board(marks), len(tasks), list(pool.take(limit))
    waiting, pending = list(tasks), {}                # ObjectRef -> (task, attempt, worker)
    finished: set[str] = set()
    failures: dict[str, str] = {}

    def start(task: Task, attempt: int) -> None:
        how, times = asked.get(task.name, (None, 0))
        worker = idle.pop(0)
        pending[worker.call.remote(task.fn, *task.args, how if attempt <= times else None)] = (task, attempt, worker)

    while waiting or pending:
        while idle and (ready := [t for t in waiting if t.after in (None, *finished)]):
            waiting.remove(ready[0])
            start(ready[0], 1)
        if not pending:  # what is left waits for a task that never ran (cannot happen with `after` in `tasks`)
            raise RuntimeError(f"tasks {[t.name for t in waiting]} wait for tasks not given")
        [ref], _ = ray.wait(list(pending), num_returns=1)
        task, attempt, worker = pending.pop(ref)
        try:
            value = ray.get(ref)
        except ray.exceptions.RayError as e:
            who, why = board.worker_of(task.name) or "a worker", _reason(e)
            board.finished(task.name, who, ok=False)
            idle.append(worker if isinstance(e, ray.exceptions.RayTaskError) else pool.replace(worker))
            if attempt == 1:
                say(f"{what} {task.name} failed on {who} ({why}): trying it once more")
                start(task, 2)
                continue
            failures[task.name] = why
            finished.add(task.name)
            say(f"[{len(finished)}/{total}] {what} {task.name} FAILED again on {who} ({why})")
        else:
            idle.append(worker)
            board.finished(task.name, getattr(getattr(value, "worker", None), "label", None), ok=True)
            finished.add(task.name)
            say(f"[{len(finished)}/{total}] {on_result(task.name, value)}")
        say(board.line([t.name for t, _, _ in pending.values()], len(waiting)))
    return failures


def _new_job(cfg: Any, report_dir: str | Path | None) -> _Job:
    from common.files import cache_root

    marks = Path(report_dir) / ".workers" if report_dir is not None else None
    if marks is not None:
        marks.mkdir(parents=True, exist_ok=True)
        for stale in marks.glob("*.json"):  # a killed driver's
            stale.unlink(missing_ok=True)
    return _Job(cfg, str(cache_root()), uuid.uuid4().hex, str(marks) if marks else None)


def _probe_task(job: _Job) -> WorkerInfo:
    from common.files import CACHE_ENV

    os.environ[CACHE_ENV] = job.cache_dir
    return this_worker(job.cfg.device)


def probe(job: _Job) -> WorkerInfo:
    """One worker's device, as the rows will see it: the keys a rerun compares are made with it."""
    ray = import_ray()
    try:
        [worker] = _pool(job.cfg.device).take(1)
        return ray.get(worker.call.remote(_probe_task, job))
    except ray.exceptions.RayError as e:
        raise WorkbenchError(f"the Ray workers cannot start ({_reason(e)})") from None


def mixed_models(models: Mapping[str, str | None]) -> str | None:
    """A warning when the rows (name -> the GPU or CPU model that timed them) were timed on different models,
    whose latencies are not comparable; None when they were all timed on one."""
    by: dict[str, list[str]] = {}
    for name, model in models.items():
        by.setdefault(model or "unknown", []).append(name)
    if len(by) < 2:
        return None
    return ("rows timed on different processor models, whose latencies are not comparable: "
            + "; ".join(f"{model}: {', '.join(names)}" for model, names in by.items()))


# ------------------------------------------------------------------------------------------------ the sweep

@dataclass(frozen=True)
class RowOut:
    """A row task's answer: its result (None for a calibration), the seconds and line, and where it ran."""

    name: str
    result: Any                      # eval.report.BuildResult
    seconds: float
    line: str
    worker: WorkerInfo
    said: tuple[str, ...] = ()


def _sweep_task(job: _Job, name: str, mode: str, stored: Any, fail: str | None) -> RowOut:
    """In a worker: calibrate for row `name` (mode "calibrate"), measure it ("measure": eval.sweep's build,
    evaluation and timing) or time it again ("retime", keeping the `stored` result's accuracy)."""
    from eval import sweep

    worker = _enter(job, name)
    cfg = job.cfg
    inp, calibrations = _job_state(job.token, lambda: _sweep_state(cfg))
    row = next(r for r in inp.rows if r.name == name)
    rinp = sweep._row_inputs(cfg, inp, row)
    policy, ckey = row.policy(cfg.half), calibrations.key(row)
    t0 = time.perf_counter()
    result, line = None, ""
    if mode == "calibrate":
        calibrations.get(row, ckey)
        line = "; ".join(s.strip() for s in _SAID if s.strip().startswith("calibration")) or "calibrated"
    elif mode == "retime":
        result, line = sweep._retime_row(cfg, rinp, calibrations, row, policy, ckey, stored)
    else:
        result, _, line = sweep._measure_row(cfg, rinp, calibrations, row, policy, ckey, None)
    _fail_if_asked(fail)
    return RowOut(name, result, time.perf_counter() - t0, line, worker, tuple(_SAID))


def _sweep_state(cfg) -> tuple[Any, Any]:
    from eval import sweep

    inp = sweep._load_inputs(cfg)
    return inp, sweep._Calibrations(cfg, inp)


@dataclass
class _Plan:
    """A row as the driver sees it before dispatch: its keys, and what its stored file offers."""

    row: Any                         # eval.sweep.GridRow
    policy: Any
    ckey: str | None
    key: dict
    path: Path
    result: Any = None               # the stored result (accuracy reusable)
    why: str | None = None           # why the stored row cannot be reused
    retime: str | None = None        # why its timing must be taken again


def _plans(cfg, inp, calibrations, description: dict, tkey: dict) -> list[_Plan]:
    """Every row's keys (made with the workers' device) and what is stored for it, said as the sweep says it."""
    from eval import sweep

    plans, n = [], len(inp.rows)
    for i, row in enumerate(inp.rows, 1):
        rinp = sweep._row_inputs(cfg, inp, row)
        policy, ckey = row.policy(cfg.half), calibrations.key(row)
        plan = _Plan(row, policy, ckey, sweep._row_key_for(cfg, inp, rinp, policy, ckey, description),
                     sweep.row_path(Path(cfg.report_dir), row.name))
        del rinp
        if not cfg.force:
            plan.result, plan.why, plan.retime = sweep.stored_row(plan.path, plan.key, tkey)
        if plan.result is not None:
            plan.result = replace(plan.result, is_baseline=row is inp.baseline)
            cfg.say(f"[{i}/{n}] row {row.name}: finished earlier, "
                    + (f"its accuracy reused; {plan.retime}: timing it again" if plan.retime else
                       f"reusing its result (EM {plan.result.exact_match:.2f}, F1 {plan.result.f1:.2f})"))
        elif plan.why:
            cfg.say(f"[{i}/{n}] row {row.name}: {plan.why}: recomputing")
        plans.append(plan)
    return plans


def _kind(policy) -> tuple:
    """Rows of one kind time the same kernels: on CUDA the first of each kind runs before the rest."""
    return (policy.int8, getattr(policy, "fp8", False), policy.fp16, policy.sparse)


@dataclass
class _SweepRun:
    """The driver's state while the rows run: results as they arrive, stored at once."""

    cfg: Any
    inp: Any
    probe: WorkerInfo
    tkey: dict                       # the timing key rows are stored under (CPU: the driver's, which times them)
    plans: dict[str, _Plan]
    results: dict[str, Any] = field(default_factory=dict)
    models: dict[str, str | None] = field(default_factory=dict)  # row -> the GPU/CPU model that timed it
    computed: list[str] = field(default_factory=list)
    timed: list[str] = field(default_factory=list)               # retimed on a worker

    def bench(self) -> tuple[tuple[int, int], float]:
        from eval import sweep

        return (self.cfg.bench_iterations, self.cfg.bench_warmup), sweep._tolerance(self.cfg)

    def row_done(self, name: str, out: RowOut) -> str:
        """A row's result from a worker, stored at once (CPU: as not stable, to be timed again here)."""
        from eval import sweep
        from eval.compare import latency_line
        from eval.report import delta_f1

        plan, cfg, cpu = self.plans[name], self.cfg, self.cfg.device.type == "cpu"
        result = replace(out.result, is_baseline=plan.row is self.inp.baseline)
        if cpu:
            result = replace(result, latency=tuple(replace(lat, stable=False) for lat in result.latency))
        tkey = self.tkey if cpu else sweep.timing_key(out.worker.machine, *self.bench())
        key = {**plan.key, "device": sweep._plain_json(out.worker.description)}  # the device it really ran on
        if key != plan.key:
            cfg.say(f"  row {name} ran on {out.worker.label}, another device than the first worker's: stored "
                    "under its own key (a rerun recomputes it unless it lands on such a device)")
        sweep.store_row(plan.path, key, result, out.seconds, tkey, timed_on=out.worker.timed_on())
        self.results[name], self.models[name] = result, out.worker.timed_on()["model"]
        (self.computed if plan.result is None else self.timed).append(name)
        if cfg.on_row_done is not None:
            cfg.on_row_done(name)
        base = self.results.get(self.inp.baseline.name)
        delta = (f" (ΔF1 {delta_f1(result, base):+.2f})" if base is not None and plan.row is not self.inp.baseline
                 else " (baseline)" if plan.row is self.inp.baseline else "")
        if plan.result is not None:
            return f"{name}: re-timed on {out.worker.label}: {latency_line(result.latency)}"
        rest = out.line.split("; ", 1)[-1]  # eval.sweep's line without its EM/F1, said here with ΔF1
        return f"{name} on {out.worker.label}: EM {result.exact_match:.2f} F1 {result.f1:.2f}{delta}; {rest}"


def distributed_sweep(cfg) -> Any:
    """eval.sweep's run with its rows as Ray tasks (see the module doc); returns its SweepResult."""
    from eval import sweep

    t_sweep = time.perf_counter()
    workers: Workers = cfg.distributed
    connect(workers)
    inp = sweep._load_inputs(cfg)
    quiet = replace(cfg, say=_say, on_row_done=None, progress=False, distributed=None)
    job = _new_job(quiet, cfg.report_dir)
    limit, cpu = workers.limit(cfg.device), cfg.device.type == "cpu"
    cfg.say(f"sweep: {len(inp.rows)} builds of {inp.loaded.source} on {limit} Ray worker(s) ({cfg.device.type}"
            f"{', ' + workers.address if workers.address else ''}); evaluating on {len(inp.questions.examples):,} "
            f"questions of {inp.eval_squad.path}; report in {cfg.report_dir}")
    first = probe(job)
    bench = ((cfg.bench_iterations, cfg.bench_warmup), sweep._tolerance(cfg))
    tkey = sweep.timing_key(sweep.machine_key(cfg.device) if cpu else first.machine, *bench)
    calibrations = sweep._Calibrations(cfg, inp)
    plans = _plans(cfg, inp, calibrations, first.description, tkey)
    run = _SweepRun(cfg, inp, first, tkey, {p.row.name: p for p in plans})
    if cpu:
        cfg.say("CPU workers evaluate rows side by side, so their timings are not comparable: each row is stored "
                "as not stable and timed again here, one row at a time, once every row is evaluated")
    if cfg.feature_cache and any(p.result is None for p in plans):
        inp.questions.featurized()  # into the feature cache, which every worker reads
    failed = _calibrate_first(run, job, limit, calibrations)
    tasks = _row_tasks(run, job, failed)
    failed.update(run_tasks(tasks, cfg.device, limit, run.row_done, cfg.say,
                            Path(job.marks) if job.marks else None))
    return _finish_sweep(run, calibrations, failed, t_sweep)


def _calibrate_first(run: _SweepRun, job: _Job, limit: int, calibrations) -> dict[str, str]:
    """Each calibration the rows to measure need and the cache lacks, made once (one task each) before any row
    runs; returns the rows whose calibration failed (name -> why)."""
    from calib.cache import default_cache_path

    needed: dict[str, list[str]] = {}
    for p in run.plans.values():
        if p.result is None and p.ckey and p.row.qat is None and not default_cache_path(p.ckey).exists():
            needed.setdefault(p.ckey, []).append(p.row.name)
    if not needed:
        return {}
    tasks = [Task(f"calibration:{names[0]}", _sweep_task, (job, names[0], "calibrate", None))
             for names in needed.values()]
    run.cfg.say(f"{len(tasks)} calibration(s) first, one task each")
    lost = run_tasks(tasks, run.cfg.device, limit, lambda name, out: f"{name} on {out.worker.label}: {out.line}",
                     run.cfg.say, Path(job.marks) if job.marks else None, what="task")
    return {row: f"its calibration failed ({lost[f'calibration:{names[0]}']})" for names in needed.values()
            if f"calibration:{names[0]}" in lost for row in names}


def _row_tasks(run: _SweepRun, job: _Job, failed: Mapping[str, str]) -> list[Task]:
    """The rows to measure (and on CUDA those to time again), in grid order; on CUDA each kind's first goes first."""
    cpu = run.cfg.device.type == "cpu"
    leaders: dict[tuple, str] = {}
    tasks = []
    for name, p in run.plans.items():
        if name in failed or (p.result is not None and (p.retime is None or cpu)):
            continue
        mode = "measure" if p.result is None else "retime"
        leader = None if cpu else leaders.setdefault(_kind(p.policy), name)
        tasks.append(Task(name, _sweep_task, (job, name, mode, p.result),
                          after=None if leader == name else leader))
    return tasks


def _finish_sweep(run: _SweepRun, calibrations, failed: dict[str, str], t_sweep: float):
    """The rows in grid order: on the CPU timed here one at a time (then the drift check); the report."""
    from eval import sweep

    cfg, inp = run.cfg, run.inp
    if inp.baseline.name in failed:
        raise WorkbenchError(f"the baseline row {inp.baseline.name} failed ({failed[inp.baseline.name]}): no "
                             f"report; the finished rows are stored in {Path(cfg.report_dir) / 'rows'}: rerun to "
                             "retry")
    rows = [p.row for p in run.plans.values() if p.row.name not in failed]
    reused = [r.name for r in rows if r.name not in run.computed]
    for r in rows:
        if r.name not in run.results:
            run.results[r.name] = run.plans[r.name].result
            run.models[r.name] = _stored_model(run.plans[r.name].path)
    check, retimed = None, len(run.timed)
    if cfg.device.type == "cpu":
        check, retimed = _time_here(run, rows, calibrations)
    elif run.computed or run.timed:
        check = ("timing check: not run: Ray workers timed the rows, each row alone on its GPU (the check times "
                 "rows again in one process to see drift over a run; one-process sweeps run it)")
    if check:
        cfg.say(check)
    extra = {"workers": f"{cfg.distributed.limit(cfg.device)} Ray worker(s)"
             + (f" of the cluster at {cfg.distributed.address}" if cfg.distributed.address else " on this host")}
    if cfg.device.type == "cuda":  # the workers' GPU, not the driver's (which may have none)
        from eval.measure import device_text

        extra["device"] = device_text(cfg.device, run.probe.machine)
    warning = mixed_models({r.name: run.models.get(r.name) for r in rows})
    if warning:
        cfg.say(f"warning: {warning}")
        extra["timing warning"] = warning
    results = [run.results[r.name] for r in rows]
    computed = [r.name for r in rows if r.name in run.computed]  # grid order, as in one process
    return sweep._finish(cfg, inp, results, reused, computed, t_sweep, check, retimed, failed, extra)


def _stored_model(path: Path) -> str | None:
    """The GPU or CPU model a stored row was timed on (its timing key)."""
    from common.files import read_json

    try:
        machine = (read_json(path, "stored row").get("timing_key") or {}).get("machine") or {}
    except (WorkbenchError, AttributeError):
        return None
    return machine.get("gpu") or machine.get("cpu")


def _time_here(run: _SweepRun, rows: Sequence[Any], calibrations) -> tuple[str | None, int]:
    """CPU workers: every row evaluated by them (or stored as not stable) timed again here, one at a time, and
    stored; then eval.sweep's drift check over them. Returns its line and how many reused rows were timed."""
    from eval import sweep

    cfg, inp = run.cfg, run.inp
    me = this_worker(cfg.device, driver=True)
    timed_now: set[str] = set()
    stored: dict[str, tuple] = {}
    for row in rows:
        plan = run.plans[row.name]
        if row.name in run.computed or plan.retime is not None:
            rinp = sweep._row_inputs(cfg, inp, row)
            t0 = time.perf_counter()
            result, line = sweep._retime_row(cfg, rinp, calibrations, row, plan.policy, plan.ckey,
                                             run.results[row.name])
            result = replace(result, is_baseline=row is inp.baseline)
            seconds = time.perf_counter() - t0
            sweep.store_row(plan.path, plan.key, result, seconds, run.tkey, timed_on=me.timed_on())
            run.results[row.name], run.models[row.name] = result, me.timed_on()["model"]
            cfg.say(f"  {row.name}: timed here: {line}")
            timed_now.add(row.name)
        stored[row.name] = (plan.key, run.tkey, 0.0)
    ok = replace(inp, rows=list(rows))
    check = sweep._timing_check(cfg, ok, calibrations, [run.results[r.name] for r in rows], timed_now, stored)
    for r in rows:  # the check may have timed rows again
        run.results[r.name] = _reread(run.plans[r.name].path, run.results[r.name])
    return check, len(timed_now - set(run.computed))


def _reread(path: Path, fallback: Any) -> Any:
    """A row's result as stored now (the drift check re-stores the rows it times again)."""
    from common.files import read_json
    from eval.report import BuildResult

    try:
        return replace(BuildResult.from_json(read_json(path, "stored row")["result"]),
                       is_baseline=fallback.is_baseline)
    except (WorkbenchError, KeyError, TypeError):
        return fallback


# ------------------------------------------------------------------------------------------------ sensitivity

@dataclass(frozen=True)
class VariantOut:
    measurement: Any                 # eval.sensitivity.Measurement
    worker: WorkerInfo


def _variant_task(job: _Job, variant: Any, fail: str | None) -> VariantOut:
    """In a worker: one sensitivity variant built in memory and evaluated (eval.sensitivity's evaluator, whose
    inputs the worker process keeps; always built: the driver sends each policy once)."""
    worker = _enter(job, variant.name)
    ev = _job_state(job.token, lambda: _sensitivity_evaluator(job.cfg))
    m = ev._build_and_measure(variant, ev.policy(variant))
    _fail_if_asked(fail)
    return VariantOut(m, worker)


def _sensitivity_evaluator(cfg) -> Any:
    from calib.cache import load_cache
    from calib.calibrate import load_calibration_model
    from data.squad import load_squad
    from eval.measure import Questions
    from eval.sensitivity import _Evaluator

    loaded, wordpiece = load_calibration_model(cfg.model, trust_pickle=cfg.trust_pickle, vocab_file=cfg.vocab_file)
    squad = load_squad(cfg.squad, limit=cfg.limit)
    questions = Questions(squad.examples, squad.version, cfg.feature_settings, cfg.answer_settings,
                          wordpiece=wordpiece, cache=cfg.feature_cache, progress=False)
    return _Evaluator(cfg, loaded, load_cache(cfg.calib_cache), questions)


class RemoteBuilds:
    """eval.sensitivity's builds as Ray tasks (its evaluator's `remote`): `run` measures variants in parallel,
    `measure` one (the suggestion's builds, one after another). `description`: the workers' device, which keys
    the stored variants."""

    def __init__(self, cfg):
        connect(cfg.distributed)
        self.cfg, self.limit = cfg, cfg.distributed.limit(cfg.device)
        self.job = _new_job(replace(cfg, say=_say, progress=False, distributed=None, report_dir=None),
                            cfg.report_dir)
        self.description = probe(self.job).description
        self.ready: dict[str, Any] = {}  # variant -> its Measurement, measured and not yet taken

    def run(self, variants: Sequence[Any], on_measured: Callable[[Any, Any], None], quiet: bool = False) -> None:
        """Measure `variants` (one task each); `on_measured(variant, measurement)` as each arrives (it stores
        it). Variants that fail twice end the analysis in one line."""
        cfg = self.cfg
        by_name = {v.name: v for v in variants}
        tasks = [Task(v.name, _variant_task, (self.job, v)) for v in variants]

        def done(name: str, out: VariantOut) -> str:
            self.ready[name] = m = out.measurement
            on_measured(by_name[name], m)
            return f"{name} on {out.worker.label}: EM {m.exact_match:.2f} F1 {m.f1:.2f}"

        if tasks and not quiet:
            cfg.say(f"{len(tasks)} builds on {self.limit} Ray worker(s)")
        failed = run_tasks(tasks, cfg.device, self.limit, done, (lambda line: None) if quiet else cfg.say,
                           Path(self.job.marks) if self.job.marks else None, what="variant")
        if failed:
            raise WorkbenchError(
                f"{len(failed)} variant(s) failed twice: " + "; ".join(f"{n} ({why})" for n, why in failed.items())
                + (f"; the measured ones are stored in {Path(cfg.report_dir) / 'variants'}: rerun to retry"
                   if cfg.report_dir is not None else ""))

    def measure(self, v: Any) -> Any:
        self.run([v], lambda variant, m: None, quiet=True)
        return self.ready.pop(v.name)


__all__ = ["FAIL_ENV", "RemoteBuilds", "RowOut", "Task", "VariantOut", "WorkerInfo", "Workers", "connect",
           "device_and_workers", "distributed_sweep", "import_ray", "mixed_models", "probe", "run_tasks",
           "this_worker"]
