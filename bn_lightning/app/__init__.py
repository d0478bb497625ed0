"""The Hydra training app: ``train(cfg)``, the bundled datamodules and networks.

:mod:`~bn_lightning.app.train` runs a config composed from ``conf/``; :mod:`~bn_lightning.app.data` holds the
datamodules and :mod:`~bn_lightning.app.models` the networks. Nothing is imported here: ``bn_lightning.app.data`` and
``bn_lightning.app.models`` do not import Hydra; ``bn_lightning.app.train`` does.
"""
