"""What every other group builds on, and imports nothing of the package above it: the errors, files written whole
(atomic_io), the folder lock, the command-line convention (cli), the typed training config, the published reference
figures, the machine and code a run uses, what the launcher started, and the run folder's paths and records."""
