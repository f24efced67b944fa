"""The application: the command line, ``herder serve``'s wiring, the management API and status
page, the light API client, and the embedded defaults.  It may use every room below it."""
