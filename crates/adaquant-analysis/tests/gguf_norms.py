# Frobenius and spectral norms of W_K and W_V of a few layers, from the dequantized GGUF tensors.
import sys, numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
r = GGUFReader(sys.argv[1])
t = {x.name: x for x in r.tensors}
for layer in [0, 1, 15, 29]:
    for m in ["attn_k", "attn_v"]:
        x = t[f"blk.{layer}.{m}.weight"]
        w = dequantize(x.data, x.tensor_type).astype(np.float64).reshape(-1, 576)
        s = np.linalg.svd(w, compute_uv=False)
        print(layer, m, w.shape, repr(float(np.linalg.norm(w))), repr(float(s[0])), repr(float(np.linalg.norm(w[0:64]))), repr(float(np.linalg.svd(w[64:128], compute_uv=False)[0])))
