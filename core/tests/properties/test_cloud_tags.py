"""Property tests for tag values read back from a cloud when the pool adopts instances.

Tags are outside input: another program, an operator or an older herder may have written them.
Whatever they say, a sync must adopt the instance (or leave it alone) without raising.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker"))

from worker_fakes import Harness

from herder.model import IdleBehavior

KEYS = [
    "HerderInstanceSetID",
    "HerderInstanceType",
    "HerderIdleBehavior",
    "HerderInstanceSecret",
    "Name",
    "",
]
tag_values = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["run", "hold", "drain", "RUN", "", "small", "removed-type", "\x00", " run"]),
)
tag_dicts = st.dictionaries(
    st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), tag_values, max_size=6
)


@settings(max_examples=100, deadline=None)
@given(st.lists(tag_dicts, min_size=1, max_size=4))
def test_sync_adopts_any_tags_without_raising(extra: list[dict[str, str]]) -> None:
    h = Harness()
    vms = []
    for tags in extra:
        base = h.tags()
        base.update({k: v for k, v in tags.items() if k != "HerderInstanceSetID"})
        vms.append(h.cloud.add_vm(base))
    h.sync()
    for vm in vms:
        worker = h.worker(vm.id)
        assert isinstance(worker.idle_behavior, IdleBehavior)
        h.probe(vm.id)
    h.pool.probe_round()
    h.idle()
    h.sync()
    assert all(isinstance(v.idle_behavior, IdleBehavior) for v in h.pool.instances())
