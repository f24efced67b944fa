"""The plugin registry, under the name plugin authors import.

The code lives in :mod:`herder.plugin.registry`; this name stays what the guide shows
whatever moves inside herder.
"""

from herder.plugin.registry import (
    KINDS as KINDS,
)
from herder.plugin.registry import (
    PluginError as PluginError,
)
from herder.plugin.registry import (
    PluginFailure as PluginFailure,
)
from herder.plugin.registry import (
    PluginInfo as PluginInfo,
)
from herder.plugin.registry import (
    Plugins as Plugins,
)
from herder.plugin.registry import (
    Registration as Registration,
)
from herder.plugin.registry import (
    Registry as Registry,
)
from herder.plugin.registry import (
    load_target as load_target,
)
