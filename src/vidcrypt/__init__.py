"""vidcrypt."""
