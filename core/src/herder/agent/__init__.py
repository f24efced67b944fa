"""The runner agent herder copies to every instance (standard library only)."""

from pathlib import Path

#: The agent program itself, as copied to instances and run by the local dispatcher.
PROGRAM = Path(__file__).with_name("herder_runner.py")
