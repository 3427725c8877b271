"""Files and data: parallel text and batches, the tokenizer, model directories and checkpoints,
atomic writes."""
