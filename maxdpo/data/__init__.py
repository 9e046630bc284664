"""Preference data: load rows, tokenise pairs as TRL does, batch them with grain."""
