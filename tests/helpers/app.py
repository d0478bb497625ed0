"""Overrides that shrink a training-job config to a couple of quiet batches (about a second per run)."""

from __future__ import annotations

QUICK_RUN = (
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
)
# the same, recording on every step (callbacks that log every `log_every_n_steps`)
QUICK_RUN_LOGGED = (*QUICK_RUN, "trainer.log_every_n_steps=1")
