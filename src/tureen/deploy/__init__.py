"""Operating a tureen deployment from the command line: ``tureen deploy switch`` (blue-green)."""
