"""herder-driver-example: a minimal, complete herder cloud driver to copy from.

The driver itself is in :mod:`herder_driver_example.driver`; :mod:`herder_driver_example.plugin`
registers it with herder under the name ``example``.
"""

__version__ = "0.1.0"
