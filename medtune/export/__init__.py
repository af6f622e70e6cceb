"""Export: merging an adapter into its base, the model card, GGUF files and their Ollama Modelfiles."""
