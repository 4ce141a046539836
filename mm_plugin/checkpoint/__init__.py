"""Training checkpoints as every layer reads them: ``reading`` (find, verify while reading, model weights,
common state, saved model configuration) and ``manifest`` (the CRC-32 of every file). Writing them and
resuming a run are ``mm_plugin.training.checkpointing``'s."""
