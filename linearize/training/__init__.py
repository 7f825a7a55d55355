"""Fine-tuning converted models: recipes, data, stages and the training loop."""
