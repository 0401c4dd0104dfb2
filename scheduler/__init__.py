"""Per-instance and global scheduling (built on the engine's scheduler interface)."""
