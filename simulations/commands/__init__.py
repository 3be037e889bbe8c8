"""What the `feddistill` subcommands run: simulate, partition, export/evaluate (synthetic_pack), audit, progress."""
