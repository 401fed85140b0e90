"""The service side: the daemon and its feeder thread, checkpoints and resume, collapse handling, metrics,
progress and the live probe."""
