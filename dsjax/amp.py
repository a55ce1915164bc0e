"""Automatic mixed precision, under the seed's name: `dsjax.amp.autocast`.

The implementation lives in dsjax.precision; this module is the public spelling of the seed's
`ds.amp.autocast()`.
"""

from dsjax.precision import POLICIES, Policy, autocast, compute_dtype, parse_policy

__all__ = ["POLICIES", "Policy", "autocast", "compute_dtype", "parse_policy"]
