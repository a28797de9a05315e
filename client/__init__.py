"""trimtab's client: attach a running PyTorch training loop to a trimtab controller."""
