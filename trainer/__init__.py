"""Training in its own process: stages, run directory, events, supervisor.

Importing the package is cheap; torch, transformers and TRL are imported only
inside the functions that train, so the UI and the CLI can use the
supervisor and the event reader without paying for them.
"""
