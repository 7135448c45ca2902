"""``python -m efficient_attention.conformance MODULE:CALLABLE --reference NAME``: the
conformance runner (:func:`efficient_attention.testing.conformance`) from the shell.

It imports ``CALLABLE`` from ``MODULE`` (the current directory is on the path, so
``mymodule:my_attention`` finds ``./mymodule.py``), property-tests it against the
registered variant ``NAME`` (``python -m efficient_attention --list`` shows them),
prints the report and exits with status 0 when it passed, 1 when it failed
(2 for bad arguments)::

    python -m efficient_attention.conformance my_impl:attention --reference dense --dtype float32
    python -m efficient_attention.conformance my_impl:attention_with_grads --reference local --grads
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import numpy as np

__all__ = ["main", "load_callable"]


def load_callable(spec: str):
    """The object named by ``"package.module:attr.path"``."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"candidate must be given as MODULE:CALLABLE, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec} is not callable (it is a {type(obj).__name__})")
    return obj


def main(argv=None) -> int:
    from . import registry
    from .testing import conformance

    names = sorted(registry())
    parser = argparse.ArgumentParser(
        prog="python -m efficient_attention.conformance",
        description="Property-test an attention implementation against a variant of efficient_attention.")
    parser.add_argument("candidate", help="MODULE:CALLABLE; candidate(q, k, v) -> out "
                        "(with --grads: candidate(q, k, v, dout) -> (out, dq, dk, dv))")
    parser.add_argument("--reference", required=True, choices=names, metavar="NAME",
                        help="a registered variant: " + ", ".join(names))
    parser.add_argument("--grads", action="store_true", help="also compare the gradients")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_examples < 1:
        parser.error(f"--max-examples must be >= 1, got {args.max_examples}")
    try:
        candidate = load_callable(args.candidate)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        parser.error(f"cannot load the candidate {args.candidate!r}: {exc}")
    report = conformance(candidate, args.reference, grads=args.grads, dtype=np.dtype(args.dtype),
                         max_examples=args.max_examples, seed=args.seed)
    print(report)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
