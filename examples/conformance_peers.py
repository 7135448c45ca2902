"""Property-test public attention implementations against efficient_attention.

Runs :func:`efficient_attention.testing.conformance` on the peers that are
installed (each is optional; none is a dependency of the library):

* PyTorch ``torch.nn.functional.scaled_dot_product_attention`` (outputs and
  autograd gradients): no mask, a boolean mask with fully masked rows,
  ``is_causal``, and boolean masks for a local band and for BigBird and
  Longformer patterns;
* PyTorch FlexAttention, compiled for the CPU (forward only: it has no CPU
  backward), with a sliding-window and a document ``mask_mod``;
* JAX ``jax.nn.dot_product_attention`` (outputs and ``jax.vjp`` gradients):
  no mask, a boolean mask with fully masked rows, ``is_causal`` and
  ``local_window_size``.

Prints one Markdown row per run and, for a failure, the shrunk counterexample.
Run::

    python examples/conformance_peers.py            # every installed peer, 100 examples per run
    python examples/conformance_peers.py --quick    # 20 examples, no FlexAttention compile
    pip install torch==2.13.0 "jax[cpu]"            # the peers (CPU builds)

FlexAttention compiles a kernel per shape class (about 5-10 s each on this
machine's gcc); its runs take a few minutes.
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

import efficient_attention as ea
from efficient_attention.testing import conformance

#: the window of the sliding-window and local runs
WINDOW = 2


def _document_ids(n: int) -> np.ndarray:
    """Document of each token: documents of lengths 2, 3, 1, 4, 2, 3, 1, 4, ..."""
    lengths = np.resize([2, 3, 1, 4], n)
    return np.repeat(np.arange(n), lengths)[:n]


def _document_pattern(n: int):
    doc = _document_ids(n)
    import scipy.sparse as sp
    return sp.csr_array(doc[:, None] == doc[None, :])


LOCAL = ea.Variant(f"local(window={WINDOW})", ea.LocalAttention, 1, {"window": WINDOW})
LOCAL_CAUSAL = ea.Variant(f"local(window={WINDOW}, causal)", ea.LocalAttention, 1,
                          {"window": WINDOW, "causal": True})
DOCUMENT = ea.Variant("document mask", ea.SparseAttention, 1,
                      factory=lambda n, d, dv, seed: ea.SparseAttention(_document_pattern(n)))


# --- PyTorch ------------------------------------------------------------------------------------

def torch_candidates():
    import torch
    import torch.nn.functional as F

    def tensors(*arrays, grad=False):
        return [torch.from_numpy(np.array(a)).requires_grad_(grad) for a in arrays]

    def sdpa(q, k, v, mask=None):
        (m,) = [None] if mask is None else tensors(mask)
        return F.scaled_dot_product_attention(*tensors(q, k, v), attn_mask=m).numpy()

    def sdpa_grads(q, k, v, dout, mask=None):
        t = tensors(q, k, v, grad=True)
        (m,) = [None] if mask is None else tensors(mask)
        out = F.scaled_dot_product_attention(*t, attn_mask=m)
        out.backward(torch.from_numpy(np.array(dout)))
        return (out.detach().numpy(),) + tuple(a.grad.numpy() for a in t)

    def sdpa_causal(q, k, v):
        return F.scaled_dot_product_attention(*tensors(q, k, v), is_causal=True).numpy()

    def sdpa_causal_grads(q, k, v, dout):
        t = tensors(q, k, v, grad=True)
        out = F.scaled_dot_product_attention(*t, is_causal=True)
        out.backward(torch.from_numpy(np.array(dout)))
        return (out.detach().numpy(),) + tuple(a.grad.numpy() for a in t)

    return [
        ("PyTorch SDPA", "no mask", sdpa_grads, "dense", True),
        ("PyTorch SDPA", "boolean mask (fully masked rows drawn)", sdpa_grads, "dense", True),
        ("PyTorch SDPA", "is_causal=True", sdpa_causal_grads, "dense_causal", True),
        ("PyTorch SDPA", f"boolean band mask, window {WINDOW}", sdpa_grads, LOCAL, True),
        ("PyTorch SDPA", "boolean causal band mask", sdpa_grads, LOCAL_CAUSAL, True),
        ("PyTorch SDPA", "boolean BigBird pattern", sdpa_grads, "bigbird", True),
        ("PyTorch SDPA", "boolean Longformer pattern", sdpa_grads, "longformer", True),
        ("PyTorch SDPA", "boolean mask, outputs only", sdpa, "dense", False),
    ]


def flex_candidates():
    import torch
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.config.recompile_limit = 10_000       # every shape compiled, no eager fallback
    torch._dynamo.config.cache_size_limit = 10_000
    # dynamic shapes: one compile for many sizes. With a mask_mod that indexes a captured tensor
    # (the document mask) the dynamic kernel does not compile on the CPU in torch 2.13 (Inductor's
    # C++: "'cur_qSplitSize8' was not declared in this scope", from N = 2 after N = 1), so that
    # run compiles each shape on its own (static shapes, slower)
    flex_dynamic = torch.compile(flex_attention, dynamic=True)
    flex_static = torch.compile(flex_attention, dynamic=False)

    def as4d(a):
        return torch.from_numpy(np.ascontiguousarray(a)).reshape((-1, 1) + a.shape[-2:])

    def run(mask_mod, q, k, v, flex=flex_dynamic):
        block_mask = create_block_mask(mask_mod, None, None, q.shape[-2], k.shape[-2], device="cpu")
        out = flex(as4d(q), as4d(k), as4d(v), block_mask=block_mask)
        return out.reshape(q.shape[:-1] + v.shape[-1:]).numpy()

    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= WINDOW

    def flex_sliding(q, k, v):
        return run(sliding_window, q, k, v)

    def flex_document(q, k, v):
        doc = torch.from_numpy(_document_ids(q.shape[-2]))

        def document(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]
        return run(document, q, k, v, flex=flex_static)

    return [
        ("FlexAttention (compiled, CPU)", f"sliding-window mask_mod, window {WINDOW}", flex_sliding, LOCAL, False),
        ("FlexAttention (compiled, CPU)", "document mask_mod (static shapes)", flex_document, DOCUMENT, False),
    ]


# --- JAX ------------------------------------------------------------------------------------------

def jax_candidates():
    import jax
    import jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)

    def to_jax(a):      # (..., N, D) -> (B, N, 1 head, D), JAX's (batch, sequence, heads, features)
        return jnp.asarray(np.asarray(a).reshape((-1,) + a.shape[-2:])[:, :, None, :])

    def from_jax(x, like):
        return np.asarray(x)[:, :, 0, :].reshape(like.shape[:-1] + x.shape[-1:])

    def jax_mask(mask, q, k):
        if mask is None:
            return None
        full = np.broadcast_to(mask, q.shape[:-1] + k.shape[-2:-1]).reshape((-1, 1) + (q.shape[-2], k.shape[-2]))
        return jnp.asarray(full)

    def make(**options):
        # JAX wants one width for q, k and v: pad all three with zero columns to max(D, Dv)
        # (zeros change no score) and pass the scale of the unpadded D
        def padded(q, k, v):
            width = max(q.shape[-1], v.shape[-1])
            pad = [lambda a: np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])])]
            return tuple(to_jax(pad[0](a)) for a in (q, k, v)), q.shape[-1] ** -0.5

        def with_grads(q, k, v, dout, mask=None):
            m = jax_mask(mask, q, k)
            (jq, jk, jv), scale = padded(q, k, v)
            out, vjp = jax.vjp(lambda a, b, c: jax.nn.dot_product_attention(a, b, c, mask=m, scale=scale, **options),
                               jq, jk, jv)
            g = to_jax(np.pad(dout, [(0, 0)] * (dout.ndim - 1) + [(0, out.shape[-1] - dout.shape[-1])]))
            dq, dk, dv = vjp(g.astype(out.dtype))
            return tuple(from_jax(x, like)[..., :like.shape[-1]].astype(q.dtype)
                         for x, like in ((out, np.empty(q.shape[:-1] + v.shape[-1:])), (dq, q), (dk, k), (dv, v)))
        return with_grads

    plain = make()
    causal = make(is_causal=True)
    window = make(local_window_size=(WINDOW, WINDOW))
    return [
        ("JAX dot_product_attention", "no mask", lambda q, k, v, dout: plain(q, k, v, dout), "dense", True),
        ("JAX dot_product_attention", "boolean mask (fully masked rows drawn)", plain, "dense", True),
        ("JAX dot_product_attention", "is_causal=True", lambda q, k, v, dout: causal(q, k, v, dout),
         "dense_causal", True),
        ("JAX dot_product_attention", f"local_window_size=({WINDOW}, {WINDOW})",
         lambda q, k, v, dout: window(q, k, v, dout), LOCAL, True),
    ]


PEERS = {"torch": torch_candidates, "flex": flex_candidates, "jax": jax_candidates}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 examples per run, no FlexAttention")
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--only", nargs="+", choices=sorted(PEERS), default=sorted(PEERS))
    args = parser.parse_args(argv)
    examples = args.max_examples or (20 if args.quick else 100)
    peers = [p for p in args.only if not (args.quick and p == "flex")]

    print("| implementation | how it is called | reference | dtype | compared | result | examples | s |")
    print("|---|---|---|---|---|---|---|---|")
    failures = []
    for peer in peers:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                runs = PEERS[peer]()
        except ImportError as exc:
            print(f"| {peer} | not installed ({exc.name}) | | | | | | |")
            continue
        for name, how, candidate, reference, grads in runs:
            for dtype in args.dtype:
                if peer == "flex" and dtype == "float64":
                    continue                         # one dtype is enough to show the compiled kernel
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    report = conformance(candidate, reference, grads=grads, dtype=np.dtype(dtype),
                                         max_examples=examples, seed=args.seed)
                seconds = time.perf_counter() - start
                ref_name = reference if isinstance(reference, str) else reference.name
                print(f"| {name} | {how} | `{ref_name}` | {dtype} | {'out, dq, dk, dv' if grads else 'out'} | "
                      f"{'passed' if report.passed else '**failed**'} | {report.examples} | {seconds:.1f} |",
                      flush=True)
                if not report.passed:
                    failures.append((name, how, report))
    for name, how, report in failures:
        print(f"\n### {name}, {how}\n\n```\n{report}\n```")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
