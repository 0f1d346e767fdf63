"""daemon: see docs/DESIGN.md for what this room does and may import."""
