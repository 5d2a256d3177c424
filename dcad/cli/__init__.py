"""The `dcad` command line."""
