"""Running what the pipeline produced: perplexity of eager, graph, fake-quant and `.pte` models."""
