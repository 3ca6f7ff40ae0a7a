"""The ``memory3`` command: serve, administer, ingest, query, train, generate. It sits above
every other package and imports each only when its subcommand runs."""
