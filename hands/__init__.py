"""Hands: disposable sandboxes in which the model's tool calls run."""
