"""`python -m vpt.evals.gsm8k`: the command's name before the layout by role (README of 2026-12-07 and earlier);
it runs `python -m vpt.language.evals.gsm8k`."""

import runpy

if __name__ == "__main__":
  runpy.run_module("vpt.language.evals.gsm8k", run_name="__main__", alter_sys=True)
