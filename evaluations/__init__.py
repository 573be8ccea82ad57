"""TensorFlow-free evaluator: FID, sFID, Inception Score, precision and recall.

See ``evaluations/README.md``. ``evaluations.evaluator`` holds the metrics and the CLI,
``evaluations.inception`` the FID Inception-v3 graph in PyTorch and
``evaluations.fmnist_net`` the project's offline Fashion-MNIST feature network.
"""


class EvaluatorError(Exception):
    """A bad input or missing resource, reported by the CLI as one ``error: ...`` line."""
