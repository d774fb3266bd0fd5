"""Example models shipped with stagewise (``stagewise.examples``); only ``cifar10`` is packaged."""
