"""pdserve: the command line, the one config schema, and the composition of the service."""
