"""One module per `kronosd` sub-command; each exposes `register(subparsers)`."""
