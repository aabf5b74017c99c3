"""Rewards beyond the learned reward model: GPT-4's rule-based reward model (rbrm.py)."""
