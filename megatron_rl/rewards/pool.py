"""Reward checks in killable worker processes, and reward functions loaded by import path.

A verifier that raises, hangs or runs out of memory must cost one response its reward (0.0, counted
and logged), never the training step. concurrent.futures cannot kill a hung task, so each worker is
a plain spawned Process fed one check at a time over its own Pipe; the parent kills and replaces a
worker whose check passes its deadline.
"""
from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import resource
import time
from multiprocessing.connection import wait
from typing import Callable, Iterable, Sequence

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, str], float]

# reward.fn names of the built-in verifiers; any other value is a "package.module:function" spec.
BUILTIN_REWARD_FNS = {
    "math": "megatron_rl.rewards.math:math_reward",
    "exact": "megatron_rl.rewards.synthetic:exact_answer_reward",
}

WORKER_START_TIMEOUT_S = 120.0  # spawn + imports (sympy, torch via the fn's package) on a busy host


def reward_fn_target(spec: str, allowed_modules: Iterable[str] = ()) -> tuple[str, str]:
    """(module, attribute) of the reward function `spec` names, checked without importing
    anything: ValueError for a malformed spec, PermissionError for a module outside
    `allowed_modules` (and their subpackages)."""
    target = BUILTIN_REWARD_FNS.get(spec, spec)
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute.isidentifier() or module_name.startswith("."):
        raise ValueError(f"reward function {spec!r}: expected 'math', 'exact' or "
                         "'package.module:function'")
    if spec not in BUILTIN_REWARD_FNS:
        allowed = list(allowed_modules)
        if not any(module_name == m or module_name.startswith(m + ".") for m in allowed):
            raise PermissionError(
                f"reward function {spec!r}: module '{module_name}' is not in "
                f"reward.allowed_modules {allowed}")
    return module_name, attribute


def load_reward_fn(spec: str, allowed_modules: Iterable[str] = ()) -> RewardFn:
    """The reward function named by `spec`: "math", "exact" or "package.module:function".

    A user module must be one of `allowed_modules` or inside one of those packages; the check runs
    before the import, because importing a module already executes its code.
    """
    module_name, attribute = reward_fn_target(spec, allowed_modules)
    fn = getattr(importlib.import_module(module_name), attribute, None)
    if fn is None:
        raise ValueError(f"reward function {spec!r}: module '{module_name}' has no attribute "
                         f"'{attribute}'")
    if not callable(fn):
        raise TypeError(f"reward function {spec!r} is not callable (got {type(fn).__name__})")
    return fn


def _limit_address_space(memory_limit_mb: int) -> None:
    # The cap is on growth beyond the worker's start-up footprint (interpreter + imports), so the
    # configured number means "memory one check may use" whatever the imports cost.
    with open("/proc/self/statm") as f:
        current_bytes = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = current_bytes + memory_limit_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _worker_main(conn, fn: RewardFn, memory_limit_mb: int | None) -> None:
    if memory_limit_mb:
        _limit_address_space(memory_limit_mb)
    conn.send("ready")
    while True:
        task = conn.recv()
        if task is None:
            return
        index, response, answer = task
        try:
            result = (index, "ok", float(fn(response, answer)))
        except MemoryError:
            result = (index, "memory", "MemoryError")
        except BaseException as e:  # noqa: BLE001 - any verifier fault costs one reward, not the worker
            result = (index, "error", f"{type(e).__name__}: {e}")
        conn.send(result)


class _Worker:
    def __init__(self, context, fn: RewardFn, memory_limit_mb: int | None):
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child_conn, fn, memory_limit_mb),
                                       daemon=True)
        self.process.start()
        child_conn.close()
        self.task_index: int | None = None
        self.deadline = 0.0

    def wait_ready(self) -> None:
        failure = None
        if self.conn.poll(WORKER_START_TIMEOUT_S):
            try:
                if self.conn.recv() == "ready":
                    return
            except (EOFError, OSError) as e:
                failure = e
        self.kill()
        raise RuntimeError(
            f"reward worker failed to start (exit code {self.process.exitcode}, "
            f"{failure or 'no ready signal'}); "
            "the reward function must be importable by module path in a fresh process")

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class RewardPool:
    """Scores (response, answer) pairs with `fn` in `num_workers` spawned processes.

    Per check: an exception -> 0.0 counted as "error"; MemoryError (e.g. from the per-worker
    RLIMIT_AS of `memory_limit_mb`) or a worker that dies -> 0.0 counted as "memory"/"error";
    no result within `timeout_s` -> 0.0 counted as "timeout", the worker is killed and replaced.
    So `score` returns within about timeout_s * ceil(n / num_workers) plus worker restarts.
    Workers persist across calls; close() (or `with`) ends them.
    """

    def __init__(self, fn: RewardFn, num_workers: int = 4, timeout_s: float = 10.0,
                 memory_limit_mb: int | None = None):
        if num_workers < 1 or timeout_s <= 0:
            raise ValueError(f"RewardPool needs num_workers >= 1 and timeout_s > 0, got "
                             f"{num_workers}, {timeout_s}")
        self._fn, self._timeout_s, self._memory_limit_mb = fn, timeout_s, memory_limit_mb
        # spawn: the trainer holds threads (and maybe CUDA); forking it is unsafe.
        self._context = multiprocessing.get_context("spawn")
        # All workers start before any is awaited, so their start-up (imports) overlaps.
        self._workers = [self._new_worker() for _ in range(num_workers)]
        for worker in self._workers:
            worker.wait_ready()

    def _new_worker(self) -> _Worker:
        return _Worker(self._context, self._fn, self._memory_limit_mb)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        replacement = self._new_worker()
        replacement.wait_ready()
        self._workers[self._workers.index(worker)] = replacement

    def score(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[float], dict[str, int]]:
        """(rewards in input order, {"timeout": k, "error": k, "memory": k}) for the pairs."""
        if not self._workers:
            raise RuntimeError("RewardPool is closed")
        rewards = [0.0] * len(pairs)
        counts = {"timeout": 0, "error": 0, "memory": 0}
        pending = list(range(len(pairs) - 1, -1, -1))  # popped from the end: input order
        outstanding = 0

        def fault(index: int, kind: str, detail: str) -> None:
            counts[kind] += 1
            logger.warning("reward check %d -> 0.0 (%s: %s)", index, kind, detail)

        while pending or outstanding:
            for worker in self._workers:
                if worker.task_index is None and pending:
                    index = pending.pop()
                    worker.conn.send((index, *pairs[index]))
                    worker.task_index, worker.deadline = index, time.monotonic() + self._timeout_s
                    outstanding += 1
            busy = [w for w in self._workers if w.task_index is not None]
            ready = wait([w.conn for w in busy],
                         timeout=max(0.0, min(w.deadline for w in busy) - time.monotonic()))
            for worker in busy:
                index = worker.task_index
                if worker.conn in ready:
                    try:
                        _, status, value = worker.conn.recv()
                    except (EOFError, OSError):  # died mid-check: OOM killer, segfault, os._exit
                        fault(index, "error", f"worker exited with code {worker.process.exitcode}")
                        self._replace(worker)
                    else:
                        if status == "ok":
                            rewards[index] = value
                        else:
                            fault(index, status, value)
                        worker.task_index = None
                    outstanding -= 1
                elif time.monotonic() >= worker.deadline:
                    fault(index, "timeout", f"no result within {self._timeout_s}s, worker replaced")
                    self._replace(worker)
                    outstanding -= 1
        return rewards, counts

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self._workers:
            worker.process.join(timeout=1.0)
            worker.kill()
        self._workers = []

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
