"""Old command names (`python -m vpt.evals.gsm8k`): the evaluators live in vpt/language/evals and vpt/vision."""
