"""Placeholder: replaced by the real post-import hook."""
