"""Reference models: overdrive.models.llama (Llama-style decoder, 8B/70B shapes)."""
