"""Training loop (an application of the library)."""
