"""The `frugal` command line."""
