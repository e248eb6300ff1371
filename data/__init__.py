"""SQuAD data for the workbench: reading question files, WordPiece tokenization, sliding-window features and
answer extraction from start/end logits, following Hugging Face run_qa so accuracy matches the reference."""
