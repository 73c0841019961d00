#!/usr/bin/env python3
"""`make bench-fidelity`: how much a selection changes when the model's matrix
products run in bf16 instead of f32.

Compares two run folders of `dsel select` made with the same arguments and
seed, one with `--precision f32` and one with `--precision bf16`:
  * Spearman rank correlation of the scores (scores.parquet, rows scored in
    both; ToV's U and other unscored rows are NaN and left out);
  * overlap of the top 5% by score;
  * overlap of the selections (selection.jsonl ids);
  * the largest and median |score difference| against the scores' spread.
Prints a markdown table and, with --json, writes the figures.

Usage: precision_fidelity.py F32_RUN BF16_RUN [--json out.json]
"""
import argparse, json, math, statistics, sys

import pyarrow.parquet as pq


def scores(run):
    t = pq.read_table(f"{run}/scores.parquet").to_pydict()
    return {i: s for i, s in zip(t["id"], t["score"]) if s is not None and math.isfinite(s)}


def selection(run):
    with open(f"{run}/selection.jsonl") as f:
        return [json.loads(line)["id"] for line in f if line.strip()]


def ranks(values):
    """Average ranks (ties share their mean rank)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    r = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def pearson(x, y):
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    return sxy / (sx * sy) if sx > 0 and sy > 0 else float("nan")


def top(d, frac):
    k = max(1, round(frac * len(d)))
    return set(sorted(d, key=lambda i: (-d[i], i))[:k])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("f32")
    ap.add_argument("bf16")
    ap.add_argument("--json")
    a = ap.parse_args()
    s32, s16 = scores(a.f32), scores(a.bf16)
    ids = sorted(set(s32) & set(s16))
    if len(ids) < 3:
        sys.exit(f"fewer than 3 rows scored in both runs ({len(ids)})")
    x, y = [s32[i] for i in ids], [s16[i] for i in ids]
    rho = pearson(ranks(x), ranks(y))
    t32, t16 = top({i: s32[i] for i in ids}, 0.05), top({i: s16[i] for i in ids}, 0.05)
    sel32, sel16 = selection(a.f32), selection(a.bf16)
    diff = [abs(p - q) for p, q in zip(x, y)]
    spread = statistics.pstdev(x)
    out = {
        "rows": len(ids),
        "spearman": rho,
        "top5_overlap": len(t32 & t16) / len(t32),
        "top5_size": len(t32),
        "selection_overlap": len(set(sel32) & set(sel16)) / max(1, len(sel32)),
        "selection_size": len(sel32),
        "max_abs_diff": max(diff),
        "median_abs_diff": statistics.median(diff),
        "score_std_f32": spread,
    }
    print("| rows | Spearman | top-5% overlap | selection overlap | median \\|Δscore\\| / std | max \\|Δscore\\| / std |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {out['rows']} | {rho:.4f} | {out['top5_overlap']:.2f} ({len(t32 & t16)}/{len(t32)}) "
        f"| {out['selection_overlap']:.2f} ({len(set(sel32) & set(sel16))}/{len(sel32)}) "
        f"| {out['median_abs_diff'] / spread:.3f} | {out['max_abs_diff'] / spread:.3f} |"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
