"""Fine-tuning configs that start from a pretrained Hugging Face checkpoint."""
