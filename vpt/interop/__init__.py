"""Old command names (`python -m vpt.interop.hf`): the interop code lives in vpt/language/interop and vpt/vision/interop."""
