"""Language data: the embedded synthetic math set, record sources, tokenizer and grain pipeline.

Import the modules themselves (`from vpt.language.data import sources`): the package imports nothing,
so light modules (synthetic_math, which config_lib reads) do not pull in grain and JAX.
"""
