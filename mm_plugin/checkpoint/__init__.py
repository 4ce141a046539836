"""Training checkpoints as every layer reads them: ``reading`` (find, verify while reading, model weights,
common state, saved model configuration), ``writing`` (a model's weights with their bookkeeping, atomically)
and ``manifest`` (the CRC-32 of every file). A training run's optimizer, schedule and RNG states, and resuming
a run, are ``mm_plugin.training.checkpointing``'s."""
