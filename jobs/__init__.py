"""The job: its spec, states and transitions, persistence and settings. No torch."""
