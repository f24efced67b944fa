"""The runner agent herder copies to every instance (standard library only)."""
