"""plugtron-example-plugin: how a third party adds a model family to plugtron.

Nothing is imported here on purpose: ``plugtron plugins`` imports only
:mod:`plugtron_example.plugin`, and that module stays free of torch.
"""

__version__ = "0.1.0"
