"""Independent reimplementation of the rate-distortion greedy bit allocation of arXiv 2502.15075.

Error model of a matrix with norm s at width b: s^2 * 2^(-2 b).
Every matrix starts at the narrowest width; each step raises the matrix whose next width removes the most modelled
error per added bit, skipping steps that would pass the budget, until the budget is met or no step fits.
Ties keep the earlier matrix (a later one must beat the best gain by more than 1e-6).
Matrices are ordered K0, V0, K1, V1, ...; the total budget is 2 * layers * average bits.

Usage: python3 greedy_reference.py NORMS.json BUDGET [WIDTHS...]
Prints the K widths and the V widths, one JSON list per line.
"""

import json
import sys


def greedy(sens, total, widths):
    widths = sorted(widths)
    step = {a: b for a, b in zip(widths, widths[1:])}
    bits = [widths[0]] * len(sens)
    used = widths[0] * len(sens)
    while used + 1e-6 < total:
        best, pick = -1.0, None
        for i, s in enumerate(sens):
            nb = step.get(bits[i])
            if nb is None or used + (nb - bits[i]) - total > 1e-6:
                continue
            gain = s * s * (2.0 ** (-2 * bits[i]) - 2.0 ** (-2 * nb)) / (nb - bits[i])
            if gain > best + 1e-6:
                best, pick = gain, i
        if pick is None:
            break
        nb = step[bits[pick]]
        used += nb - bits[pick]
        bits[pick] = nb
    return bits


def main():
    norms = json.load(open(sys.argv[1]))
    budget = float(sys.argv[2])
    widths = [float(w) for w in sys.argv[3:]] or [1, 1.58, 2, 3, 4, 6, 8]
    sens = [x for kv in zip(norms["w_k"], norms["w_v"]) for x in kv]
    bits = greedy(sens, 2 * budget * len(norms["w_k"]), widths)
    print(json.dumps(bits[0::2]))
    print(json.dumps(bits[1::2]))
    print("total", sum(bits), "of", 2 * budget * len(norms["w_k"]))


if __name__ == "__main__":
    main()
