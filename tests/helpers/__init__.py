"""Test helpers: RunIf-style skips, a tiny BN model, (later) the gloo process launcher."""
