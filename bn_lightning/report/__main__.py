from bn_lightning.report.cli import entry_point

entry_point()
