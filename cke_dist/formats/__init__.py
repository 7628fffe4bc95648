"""Files in and out, knowing nothing of the model code that uses them: Hugging Face directories
(hf.py), our sharded checkpoints (checkpoint.py), GGUF (gguf.py), tokenizers (tokenizer.py)."""
