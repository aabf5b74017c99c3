"""gptstack: the GPT-series recipe (GPT-1 to GPT-4) as one small PyTorch stack."""

__version__ = "0.1.0"
