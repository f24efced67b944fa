"""The cloud engine (SPEC §3-9): the scheduler, the worker pool, instance-type choice, metrics,
and the interface the application sees every engine through (:mod:`herder.engine.interface`).

Kept empty so that importing one part does not import the rest.
"""
