"""kronosd: the service, its configuration and the command line."""
