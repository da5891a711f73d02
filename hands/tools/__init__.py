"""The tools a sandbox offers: Anthropic's bash and text editor tools, with their trained semantics."""
