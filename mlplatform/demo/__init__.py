"""The embedded demo dataset."""
