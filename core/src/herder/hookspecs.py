"""The hooks plugins implement, under the name plugin authors import.

The code lives in :mod:`herder.plugin.hookspecs`; this name stays what the guide shows
whatever moves inside herder.
"""

from herder.plugin.hookspecs import (
    PROJECT as PROJECT,
)
from herder.plugin.hookspecs import (
    herder_register_boot_probes as herder_register_boot_probes,
)
from herder.plugin.hookspecs import (
    herder_register_dispatchers as herder_register_dispatchers,
)
from herder.plugin.hookspecs import (
    herder_register_drivers as herder_register_drivers,
)
from herder.plugin.hookspecs import (
    herder_register_executors as herder_register_executors,
)
from herder.plugin.hookspecs import (
    herder_register_queues as herder_register_queues,
)
from herder.plugin.hookspecs import (
    hookimpl as hookimpl,
)
from herder.plugin.hookspecs import (
    hookspec as hookspec,
)
