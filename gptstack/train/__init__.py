"""Training: the one Trainer loop, and one small module per objective."""
