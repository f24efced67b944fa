"""The plugin machinery: the contracts plugins implement (cloud driver, executor), the hooks
they register through, the built-in registrations and the registry over pluggy.

Plugin authors import the contracts under their public names (:mod:`herder.cloud`,
:mod:`herder.executor`, :mod:`herder.hookspecs`, :mod:`herder.plugins`), which stay put.
"""
