"""Consolidation: lightly used instances that can empty soonest are drained, and taken back."""

from __future__ import annotations

from engine_harness import Engine, GiB, sim_config

from herder.model import DrainCause, IdleBehavior

MiB = 1024**2


def _two_instances(threshold: float, **cloud: object) -> tuple[Engine, list[str], str]:
    """Instance A (created first) runs two short containers; B one long one that fills its
    RAM.  Returns the engine, the short containers and the long one."""
    eng = Engine(sim_config(consolidation_threshold=threshold, **cloud))
    shorts = [eng.submit(300, ram=2 * GiB, max_run_time=600, name=f"s{i}") for i in range(2)]
    eng.run_for(2)
    long = eng.submit(3600, ram=14 * GiB, max_run_time=7200, name="long")
    eng.run_for(40)
    assert eng.instance_of(long) != eng.instance_of(shorts[0])
    return eng, shorts, long


def _trickle(eng: Engine, until: float) -> list[str]:
    """A falling workload: one small container every 3 minutes, 4 minutes each."""
    uuids = []
    while eng.elapsed < until:
        uuids.append(eng.submit(240, ram=512 * MiB, max_run_time=600, name="t"))
        eng.run_for(180)
    return uuids


def _instance_hours(threshold: float) -> float:
    eng, shorts, long = _two_instances(threshold)
    trickle = _trickle(eng, 45 * 60)
    eng.run_until_done([*shorts, long, *trickle])
    eng.run_for(120)
    assert eng.stats.alive == 0
    assert all(eng.container(u).exit_code == 0 for u in [*shorts, long, *trickle])
    assert eng.stats.container_kills == 0 and eng.stats.created == 2
    hours = eng.stats.instance_seconds() / 3600
    eng.stop()
    return hours


def test_consolidation_cuts_instance_hours_on_a_falling_workload():
    without = _instance_hours(0.0)
    with_it = _instance_hours(0.5)
    # Without it the trickle keeps the short containers' instance alive to the end; with it
    # that instance is drained, empties after 5 minutes, and the trickle shares the long one.
    assert with_it < without - 0.5, (with_it, without)


def test_the_instance_that_empties_soonest_is_drained_with_a_reason():
    eng, shorts, long = _two_instances(0.5)
    eng.run_for(5)
    views = {v.instance: v for v in eng.instances()}
    a, b = views[eng.instance_of(shorts[0])], views[eng.instance_of(long)]
    assert a.idle_behavior == IdleBehavior.DRAIN
    assert a.drain_cause == DrainCause.CONSOLIDATION
    assert a.reason.startswith("consolidation: 2 of 4 VCPUs in use")
    assert b.idle_behavior == IdleBehavior.RUN  # one instance always keeps taking work
    eng.stop()


def test_demand_takes_a_consolidated_instance_back_instead_of_creating_one():
    eng, shorts, _long = _two_instances(0.5)
    eng.run_for(5)
    drained = eng.instance_of(shorts[0])
    # Too big for the long container's instance; fits the drained one.
    big = eng.submit(60, ram=4 * GiB)
    eng.run_for(10)
    assert eng.instance_of(big) == drained
    (view,) = [v for v in eng.instances() if v.instance == drained]
    assert view.idle_behavior == IdleBehavior.RUN and view.reason == ""
    assert eng.stats.created == 2
    eng.stop()


def test_an_operator_drain_is_never_undone():
    eng, shorts, long = _two_instances(0.5)
    eng.run_for(5)
    drained = eng.instance_of(shorts[0])
    eng.disp.pool.set_idle_behavior(drained, IdleBehavior.DRAIN)  # the operator's now
    big = eng.submit(60, ram=4 * GiB)
    eng.run_until_done([big])
    assert eng.instance_of(big) not in (drained, eng.instance_of(long))
    assert eng.stats.created == 3
    views = {v.instance: v for v in eng.disp.pool.instances()}
    if drained in views:  # still finishing its containers, or shut down already
        assert views[drained].drain_cause == DrainCause.OPERATOR
    eng.stop()


def test_an_emptied_consolidated_instance_keeps_its_paid_hour_for_demand():
    hourly = {"billing_increment": 3600, "billing_minimum": 3600}
    eng, shorts, long = _two_instances(0.5, driver_parameters=hourly)
    eng.run_for(5)
    drained = eng.instance_of(shorts[0])
    eng.run_until_done(shorts)
    eng.run_for(120)  # well past timeout_idle: still there, its hour is paid
    (view,) = [v for v in eng.instances() if v.instance == drained]
    assert view.worker_state.value == "idle" and view.drain_cause == DrainCause.CONSOLIDATION
    big = eng.submit(60, ram=4 * GiB)  # does not fit the long container's instance
    eng.run_for(10)
    assert eng.instance_of(big) == drained  # taken back, nothing created
    assert eng.stats.created == 2
    eng.run_until(3600)
    assert drained not in [v.instance for v in eng.instances()]  # gone before a second hour
    assert eng.instance_of(long) in [v.instance for v in eng.instances()]
    eng.stop()


def test_no_drain_steers_work_onto_an_instance_that_empties_sooner():
    """Demand took back an instance that empties soon; while it keeps taking work (the
    re-drain hold-off), one that empties later is not drained, or new containers would go to
    the one that empties soonest (on examples/workloads/falling.yaml that cost 1.5 % more
    instance-hours than no consolidation)."""
    eng = Engine(sim_config(consolidation_threshold=0.5))
    long = eng.submit(3600, ram=14 * GiB, max_run_time=7200, name="long")  # the keeper, full
    eng.run_for(2)
    later = eng.submit(900, ram=6 * GiB, max_run_time=1800, name="later")
    brief = eng.submit(150, vcpus=2, ram=6 * GiB, max_run_time=300, name="brief")
    eng.run_for(30)
    assert eng.instance_of(later) == eng.instance_of(brief) != eng.instance_of(long)
    soon = eng.submit(240, ram=8 * GiB, max_run_time=600, name="soon")  # fits no instance
    eng.run_for(20)
    views = {v.instance: v for v in eng.instances()}
    assert views[eng.instance_of(soon)].drain_cause == DrainCause.CONSOLIDATION
    again = eng.submit(240, ram=int(5.5 * GiB), max_run_time=600, name="again")
    eng.run_for(10)
    assert eng.instance_of(again) == eng.instance_of(soon)  # taken back, nothing created
    assert eng.stats.created == 3
    eng.run_until(200)  # "brief" ended: the instance of "later" is lightly used now
    views = {v.instance: v for v in eng.instances()}
    assert views[eng.instance_of(soon)].idle_behavior == IdleBehavior.RUN
    assert views[eng.instance_of(later)].idle_behavior == IdleBehavior.RUN, views[
        eng.instance_of(later)
    ].reason
    eng.stop()
