"""`python -m vpt.interop.hf`: the command's name before the layout by role (README of 2026-12-07 and earlier);
it runs `python -m vpt.language.interop.hf`."""

import runpy

if __name__ == "__main__":
  runpy.run_module("vpt.language.interop.hf", run_name="__main__", alter_sys=True)
