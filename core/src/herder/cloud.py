"""The cloud driver contract, under the name plugin authors import.

The code lives in :mod:`herder.plugin.cloud`; this name stays what the guide shows
whatever moves inside herder.
"""

from herder.plugin.cloud import (
    CREATE_KEY_TAG as CREATE_KEY_TAG,
)
from herder.plugin.cloud import (
    PLAIN_SECRET_PLACEHOLDER as PLAIN_SECRET_PLACEHOLDER,
)
from herder.plugin.cloud import (
    Capability as Capability,
)
from herder.plugin.cloud import (
    CapacityError as CapacityError,
)
from herder.plugin.cloud import (
    CloudError as CloudError,
)
from herder.plugin.cloud import (
    DelegatingInstance as DelegatingInstance,
)
from herder.plugin.cloud import (
    Driver as Driver,
)
from herder.plugin.cloud import (
    DriverContext as DriverContext,
)
from herder.plugin.cloud import (
    DriverFactory as DriverFactory,
)
from herder.plugin.cloud import (
    DriverParameters as DriverParameters,
)
from herder.plugin.cloud import (
    HostKey as HostKey,
)
from herder.plugin.cloud import (
    HostKeyMismatch as HostKeyMismatch,
)
from herder.plugin.cloud import (
    Instance as Instance,
)
from herder.plugin.cloud import (
    InstancePrice as InstancePrice,
)
from herder.plugin.cloud import (
    InstanceSet as InstanceSet,
)
from herder.plugin.cloud import (
    NotImplementedByDriver as NotImplementedByDriver,
)
from herder.plugin.cloud import (
    Quota as Quota,
)
from herder.plugin.cloud import (
    QuotaError as QuotaError,
)
from herder.plugin.cloud import (
    QuotaUnit as QuotaUnit,
)
from herder.plugin.cloud import (
    RateLimitError as RateLimitError,
)
from herder.plugin.cloud import (
    RemoteRunner as RemoteRunner,
)
from herder.plugin.cloud import (
    SecretRef as SecretRef,
)
from herder.plugin.cloud import (
    ThrottleBackoff as ThrottleBackoff,
)
from herder.plugin.cloud import (
    create_key as create_key,
)
from herder.plugin.cloud import (
    normalize_price_history as normalize_price_history,
)
from herder.plugin.cloud import (
    parse_capabilities as parse_capabilities,
)
