"""The bodies of the entry points."""
