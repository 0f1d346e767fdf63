"""Unit tests: one module (or one small group of modules) at a time, in process."""
