"""Workers (one per cloud instance), their runners, and the pool that owns them (SPEC §3-§6)."""
