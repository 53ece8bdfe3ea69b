"""Models: the memory spec, tokenizers, token layouts with role/block/slot labels, checkpoints, decoding."""
