"""slimtune."""
