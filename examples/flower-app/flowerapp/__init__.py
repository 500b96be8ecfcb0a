"""A Flower PyTorch app on CIFAR-10, audited by fedsim."""
