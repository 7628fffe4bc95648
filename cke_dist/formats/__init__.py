"""Files in and out, knowing nothing of the model code that uses them: Hugging Face directories
(hf.py), our sharded checkpoints (checkpoint.py), GGUF (gguf.py reads, gguf_tokenizer.py rebuilds
its tokenizer, gguf_write.py writes), the quantized weight type (quant.py) and our quantized
directories (quantized.py), tokenizers (tokenizer.py), and the names all of them share
(architectures.py)."""
