"""Walks a jaxpr's equations, nested ones included (pjit, scan, checkpoint, custom_vjp)."""
from typing import Iterator

from jax.extend import core as jex_core


def equations(closed_jaxpr) -> Iterator[jex_core.JaxprEqn]:
  """Every equation of `closed_jaxpr` and of the sub-jaxprs in its equations' parameters."""
  stack = [closed_jaxpr.jaxpr]
  while stack:
    jaxpr = stack.pop()
    for eqn in jaxpr.eqns:
      yield eqn
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (list, tuple)) else [p]):
          if hasattr(sub, "eqns"):
            stack.append(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            stack.append(sub.jaxpr)
