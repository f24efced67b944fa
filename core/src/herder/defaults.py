"""Defaults that more than one module needs, each written once.

The configuration models take their field defaults from here, and so do the pieces that can be
built without a configuration (a queue in a test, a driver context, the light command-line
client), so that the two never drift apart.  Kept in a module that imports nothing, so that a
client command (``herder submit``) can find the server without importing the configuration
models and pydantic, which alone cost a third of a second at every start, and so that the
lowest modules (``herder.plugin.cloud``, ``herder.engine.sizing``) may use it.
"""

#: Where the management API listens unless ``api.listen`` says otherwise.
API_LISTEN = "127.0.0.1:9190"
#: The port of :data:`API_LISTEN`, for a listen address given without one.
API_PORT = API_LISTEN.rpartition(":")[2]
#: The environment variable holding the management token (``api.management_token_env``).
MANAGEMENT_TOKEN_ENV = "HERDER_MANAGEMENT_TOKEN"  # noqa: S105 (a variable name, not a secret)

#: ``cluster_id`` when none is configured (Arvados' test cluster id).
CLUSTER_ID = "zzzzz"
#: ``cloud.tag_key_prefix``: what herder puts before each of its tag names on instances.
TAG_KEY_PREFIX = "Herder"

#: ``queue.path``: the SQLite queue's file, relative to the working directory.
QUEUE_FILE = "herder.db"
#: ``containers.max_dispatch_attempts``: locks of one container before it is cancelled.
MAX_DISPATCH_ATTEMPTS = 10
#: ``containers.maximum_price_factor``: how much dearer than the cheapest fitting type a
#: container may be run on when the cheapest is unavailable.
MAXIMUM_PRICE_FACTOR = 1.5
