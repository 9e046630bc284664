"""DPO family: losses (pure functions), log-probs, the jitted train/eval step, TRL-named metrics."""
