"""The CIFAR-10 example: a small ResNet, its committed weights and the scripts that train them."""
