"""The spend budget in the scheduling pass (``cloud.budget``; see :mod:`herder.spend`).

Before each pass the instances' spend is booked and the budget evaluated:

* **soft limit** reached: no new instance is created.  Containers that fit on instances that
  exist still start there; the others wait with a status that gives the spend, the limit and
  when the period ends;
* **hard limit** reached: as above, and every instance is drained (reason: the budget), so that
  each shuts down once empty.  With ``on_hard_limit: stop`` the running containers are also
  cancelled, each saying why; with ``finish`` they run to their end;
* when spend is back under the hard limit (a new period, a raised limit after a restart), the
  budget's own drains are undone.  Drains with any other cause (an operator's) are left alone.
"""

from __future__ import annotations

import logging

from herder.engine.scheduler.ops import ContainerOps
from herder.engine.worker.interfaces import WorkerPool
from herder.model import DrainCause, IdleBehavior, InstanceView, WorkerState
from herder.spend import Budget, BudgetState, SpendTracker


class BudgetEnforcer:
    """Books spend and applies the budget's limits, once per pass."""

    #: Spend is booked at most this often (a pass may run many times a second).
    UPDATE_EVERY = 1.0

    def __init__(
        self,
        *,
        pool: WorkerPool,
        ops: ContainerOps,
        tracker: SpendTracker,
        budget: Budget,
        logger: logging.Logger,
    ) -> None:
        self._pool = pool
        self._ops = ops
        self.tracker = tracker
        self.budget = budget
        self._log = logger
        self._last_update = float("-inf")
        self._state: BudgetState | None = None
        self._stopped: set[str] = set()  # containers cancelled for the hard limit

    def before_pass(self, now: float) -> str | None:
        """Book spend, enforce the hard limit; the reason no instance may be created, or None."""
        if now - self._last_update >= self.UPDATE_EVERY or self._state is None:
            self._last_update = now
            views = self._pool.instances()
            self.tracker.update(now, views)
            # Evaluated even without limits: the spend metric comes from it.
            state = self._state = self.budget.evaluate(self.tracker, now)
            if not self.budget.enabled:
                return None
            if state.hard_reached:
                self._hard_limit(state, views)
            else:
                self._stopped.clear()
                for view in views:
                    if view.drain_cause is DrainCause.BUDGET and self._pool.undo_drain(
                        view.instance, DrainCause.BUDGET
                    ):
                        self._log.info(
                            "instance %s: back under the budget's hard limit, drain undone",
                            view.instance,
                        )
        state = self._state
        if state is None or not state.soft_reached:
            return None
        return state.message()

    def _hard_limit(self, state: BudgetState, views: list[InstanceView]) -> None:
        message = state.message()
        for view in views:
            if not view.instance or view.worker_state == WorkerState.SHUTDOWN:
                continue
            if view.idle_behavior == IdleBehavior.RUN:
                reason = f"cloud budget hard limit: {message}"
                if self._pool.auto_drain(view.instance, DrainCause.BUDGET, reason):
                    self._log.warning("instance %s: draining, %s", view.instance, reason)
            if state.on_hard_limit != "stop":
                continue
            for uuid in view.running_container_uuids:
                if uuid in self._stopped:
                    continue
                self._stopped.add(uuid)
                self._ops.cancel(
                    uuid,
                    f"stopped by the cloud budget's hard limit ({message}; "
                    "cloud.budget.on_hard_limit: stop)",
                    kill=True,
                )
