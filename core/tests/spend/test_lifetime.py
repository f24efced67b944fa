"""cloud.max_instance_lifetime: old instances are drained and replaced, never killed."""

from __future__ import annotations

from engine_harness import Engine, sim_config

from herder.model import ContainerState, DrainCause, IdleBehavior


def test_an_old_instance_is_drained_finishes_its_container_and_is_replaced():
    eng = Engine(sim_config(max_instance_lifetime="10m"))
    long = eng.submit(15 * 60, name="long")
    eng.run_for(60)
    first = eng.instance_of(long)
    assert first
    eng.run_for(11 * 60)  # the instance is now over 10 minutes old
    (view,) = [v for v in eng.instances() if v.instance == first]
    assert view.idle_behavior == IdleBehavior.DRAIN
    assert view.drain_cause == DrainCause.LIFETIME
    assert "max_instance_lifetime (10m)" in view.reason
    assert eng.container(long).state == ContainerState.RUNNING  # not killed
    # New work does not go to the draining instance, though it has room: a new one comes.
    short = eng.submit(60, name="short")
    eng.run_until_done([long, short])
    assert eng.instance_of(short) not in ("", first)
    assert eng.container(long).exit_code == 0
    assert eng.container(short).exit_code == 0
    assert eng.stats.container_kills == 0 and eng.stats.container_crashes == 0
    eng.run_for(60)
    assert first not in [v.instance for v in eng.instances()]  # shut down once empty
    eng.stop()


def test_without_a_limit_the_instance_takes_the_new_work():
    eng = Engine(sim_config())
    long = eng.submit(15 * 60)
    eng.run_for(12 * 60)
    short = eng.submit(60)
    eng.run_until_done([long, short])
    assert eng.instance_of(short) == eng.instance_of(long)
    eng.stop()


def test_an_operator_hold_is_not_turned_into_a_lifetime_drain():
    eng = Engine(sim_config(max_instance_lifetime="5m"))
    ctr = eng.submit(60)
    eng.run_for(30)
    instance = eng.instance_of(ctr)
    eng.disp.pool.set_idle_behavior(instance, IdleBehavior.HOLD)
    eng.run_for(10 * 60)
    (view,) = [v for v in eng.instances() if v.instance == instance]
    assert view.idle_behavior == IdleBehavior.HOLD
    assert view.drain_cause == DrainCause.OPERATOR
    eng.stop()


def test_the_lifetime_counts_from_the_start_the_ledger_remembers_across_a_restart(tmp_path):
    config = sim_config(
        max_instance_lifetime="10m",
        queue_path=str(tmp_path / "herder.db"),
    )
    eng = Engine(config)
    long = eng.submit(30 * 60)
    eng.run_for(8 * 60)
    instance = eng.instance_of(long)
    eng.stop(keep_runtime=True)
    again = Engine(config, driver=eng.driver, runtime=eng.runtime, seed=2)
    again.run_for(3 * 60)  # 11 minutes old: drained, though adopted only 3 minutes ago
    (view,) = [v for v in again.instances() if v.instance == instance]
    assert view.drain_cause == DrainCause.LIFETIME
    assert again.container(long).state == ContainerState.RUNNING
    again.stop()
