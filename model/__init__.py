"""The reference BERT for extractive QA: its config, its readable PyTorch forward, and checkpoint loading."""
