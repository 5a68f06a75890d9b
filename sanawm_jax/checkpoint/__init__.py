"""Readers and converters for released SANA-WM checkpoints."""
