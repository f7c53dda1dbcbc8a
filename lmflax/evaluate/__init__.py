"""lmflax.evaluate: metrics that aggregate exactly across batches and hosts (`metrics`) and
metrics of generated text (`generation`: BLEU, ROUGE)."""
