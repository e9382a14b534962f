"""Comparative-loss fine-tuning for torchtune."""
