"""Everything that moves data and drives training: shards, loaders, the training loop, the CLI."""
