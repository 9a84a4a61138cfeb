"""LoRA helpers: which leaves are adapters, a frozen base for the optimizer, and folding the adapters
into the kernels (for export and for code that runs the plain layout, e.g. cached generation).

The adapters live beside the kernel they adapt (`…/q_proj/{kernel, bias, lora_a, lora_b}`, see
`vpt.language.models.lm.LoRADense`), so everything here works on the ordinary parameter pytree.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

LORA_LEAVES = ("lora_a", "lora_b")


def is_lora_path(path: str) -> bool:
  """True for a '/'-joined parameter path ending in an adapter leaf."""
  return path.rsplit("/", 1)[-1] in LORA_LEAVES


def has_lora(params: Any) -> bool:
  return any(is_lora_path(k) for k in traverse_util.flatten_dict(_as_dict(params), sep="/"))


def lora_mask(params: Any) -> Any:
  """A pytree like `params` with True at the adapter leaves (lora_a, lora_b) and False elsewhere."""
  flat = traverse_util.flatten_dict(_as_dict(params), sep="/")
  return traverse_util.unflatten_dict({k: is_lora_path(k) for k in flat}, sep="/")


def split_lora(params: Any) -> tuple[dict, dict]:
  """(adapters, base) as flat {path: array} dicts; `unflatten_dict({**base, **adapters}, sep='/')` rejoins."""
  flat = traverse_util.flatten_dict(_as_dict(params), sep="/")
  return ({k: v for k, v in flat.items() if is_lora_path(k)}, {k: v for k, v in flat.items() if not is_lora_path(k)})


def freeze_base(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """`optimizer` on the adapters only; the base gets zero updates and no optimizer state.

  (optax.multi_transform masks the frozen leaves out of the inner optimizer, so its Adam moments
  exist for the adapters alone, and gradient clipping sees the adapters' gradients alone.)
  """
  labels = lambda params: jax.tree.map(lambda m: "lora" if m else "frozen", lora_mask(params))
  return optax.multi_transform({"lora": optimizer, "frozen": optax.set_to_zero()}, labels)


def _field(cfg, name):
  return cfg[name] if hasattr(cfg, "keys") else getattr(cfg, name)


def scaling(lora_cfg) -> float:
  """α / r of a model ConfigDict or an LMConfig."""
  rank = int(_field(lora_cfg, "lora_rank"))
  if rank <= 0:
    raise ValueError(f"model.lora_rank={rank}: the parameters have LoRA adapters, expected a rank > 0")
  return float(_field(lora_cfg, "lora_alpha")) / rank


def merge_lora(params: Any, lora_cfg) -> Any:
  """The parameters without adapters: every adapted kernel becomes W + A·B·α/r (computed in >= float32).

  `lora_cfg` is the model ConfigDict or an LMConfig (fields lora_rank, lora_alpha). Works on jax and
  NumPy arrays alike (NumPy in, NumPy out). The result runs under the same model with lora_rank = 0.
  """
  flat = traverse_util.flatten_dict(_as_dict(params), sep="/")
  adapted = sorted({k.rsplit("/", 1)[0] for k in flat if is_lora_path(k)})
  if not adapted:
    return traverse_util.unflatten_dict(dict(flat), sep="/")
  scale = scaling(lora_cfg)
  out = {k: v for k, v in flat.items() if not is_lora_path(k)}
  for module in adapted:
    try:
      kernel, a, b = flat[f"{module}/kernel"], flat[f"{module}/lora_a"], flat[f"{module}/lora_b"]
    except KeyError as e:
      raise ValueError(f"LoRA parameters of {module!r} are incomplete: {e.args[0]!r} is missing") from None
    if a.shape != (kernel.shape[0], b.shape[0]) or b.shape[1] != kernel.shape[1]:
      raise ValueError(f"LoRA shapes of {module!r} do not fit its kernel {tuple(kernel.shape)}: "
                       f"lora_a {tuple(a.shape)}, lora_b {tuple(b.shape)}")
    xp = np if isinstance(kernel, np.ndarray) else jnp
    acc = xp.promote_types(kernel.dtype, xp.float32)
    delta = (xp.asarray(a, acc) @ xp.asarray(b, acc)) * scale
    out[f"{module}/kernel"] = (xp.asarray(kernel, acc) + delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(out, sep="/")


def _as_dict(params):
  # FrozenDicts and {"params": ...} wrappers are accepted as well as plain nested dicts.
  return params.unfreeze() if hasattr(params, "unfreeze") else params
