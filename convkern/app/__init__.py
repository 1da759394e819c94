"""The application built on the library: training (train, cli_train),
inference and feature maps (inference), metrics and plots. ``convkern
train``, ``predict`` and ``featuremaps`` run them."""
