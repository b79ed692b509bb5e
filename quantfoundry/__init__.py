"""The `quantfoundry` command: service processes, database, demo."""
