"""The run's checkpoints: their folders (format, readability, commit), and the component that finds, fits,
restores, saves and rotates them and keeps the exports current."""
