"""Evaluations: language modelling now; prompting, fine-tuning, instruction following and scaling later."""
