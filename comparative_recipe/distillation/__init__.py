"""Distillation from several teachers with per-token prediction weighting (``mixing``)."""
