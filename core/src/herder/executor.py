"""The executor contract, under the name plugin authors import.

The code lives in :mod:`herder.plugin.executor`; this name stays what the guide shows
whatever moves inside herder.
"""

from herder.plugin.executor import (
    ExecResult as ExecResult,
)
from herder.plugin.executor import (
    ExecStream as ExecStream,
)
from herder.plugin.executor import (
    Executor as Executor,
)
from herder.plugin.executor import (
    ExecutorError as ExecutorError,
)
from herder.plugin.executor import (
    ExecutorFactory as ExecutorFactory,
)
from herder.plugin.executor import (
    HostKeyError as HostKeyError,
)
from herder.plugin.executor import (
    NoAddressError as NoAddressError,
)
from herder.plugin.executor import (
    StreamsUnsupported as StreamsUnsupported,
)
