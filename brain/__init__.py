"""The brain: the stateless harness that drives sessions by calling the model and routing tool calls."""
