"""Tools that drive the engine from outside: ``herder simulate`` and ``herder cloudtest``."""
