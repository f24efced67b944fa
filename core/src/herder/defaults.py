"""Defaults that both the configuration models and the light command-line client need.

Kept in a module that imports nothing, so that a client command (``herder submit``) can find
the server without importing the configuration models and pydantic, which alone cost a third
of a second at every start.
"""

#: Where the management API listens unless ``api.listen`` says otherwise.
API_LISTEN = "127.0.0.1:9190"
#: The environment variable holding the management token (``api.management_token_env``).
MANAGEMENT_TOKEN_ENV = "HERDER_MANAGEMENT_TOKEN"  # noqa: S105 (a variable name, not a secret)
