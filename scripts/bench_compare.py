#!/usr/bin/env python3
"""`make bench-compare`: dsel and PyTorch side by side on this machine, in one run.

Runs, each in its own process after waiting for an idle machine:
  * PyTorch (../shared/bench/torch_anchor.py): forward + per-token log-probs
    (f32, and bf16 weights where the processor has bf16 units), the LoRA r=128
    AdamW step (f32), and LESS's reference datastore approach at r=128, d=8192
    (batch-1 backward + Adam preconditioning + block-wise Rademacher projection);
    the 2048³ GEMM in f32 (and bf16 where it has hardware);
  * `dsel bench` on every GEMM library that loads (MKL, OpenBLAS, candle), and the
    full bench on the default one;
then prints the ratios and writes runs/bench/compare.{json,md}.

Usage: bench_compare.py --dsel target/release/dsel --model MODEL.gguf --hf HF_DIR --data POOL_DIR [--out runs/bench]
"""
import argparse, json, os, subprocess, sys, time


def cpu_busy(window=3.0):
    def snap():
        with open("/proc/stat") as f:
            v = list(map(int, f.readline().split()[1:9]))
        return sum(v), v[3] + v[4]
    a = snap(); time.sleep(window); b = snap()
    dt = max(b[0] - a[0], 1)
    return (dt - (b[1] - a[1])) / dt


def wait_idle(max_wait=1200, thr=0.10):
    t = time.time()
    while time.time() - t < max_wait:
        if cpu_busy() < thr:
            return time.time() - t
    print(f"warning: machine still busy after {max_wait}s; figures may be low", file=sys.stderr)
    return time.time() - t


def bf16_hardware():
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# PyTorch side: tasks of the anchor script, plus two variants for processors
# without bf16 units (where PyTorch's bf16 runs at well under 1 GFLOP/s and the
# anchor's bf16 parts would take hours): a GEMM in f32 only, and LESS's
# reference approach with an f32 projection only.
TORCH_SNIPPET = r"""
import importlib.util, json, math, sys, time, torch
spec = importlib.util.spec_from_file_location("anchor", sys.argv[1]); A = importlib.util.module_from_spec(spec); spec.loader.exec_module(A)
task = sys.argv[2]
A.wait_idle()
if task == "matmul_f32":
    n = 2048; a = torch.randn(n, n); b = torch.randn(n, n); c = torch.empty(n, n)
    for _ in range(5): torch.mm(a, b, out=c)
    ts = []
    for _ in range(7):
        t = time.perf_counter(); [torch.mm(a, b, out=c) for _ in range(3)]; ts.append((time.perf_counter() - t) / 3)
    r = {"gflops_median": 2 * n ** 3 / A.med(ts) / 1e9}
elif task == "less_r128_f32":
    tok, model, P = A.lora_model(128, 512); model.eval()
    ids = A.make_sequences(tok, 9)
    g = torch.Generator().manual_seed(1); m = torch.rand(P, generator=g) * 1e-3; v = torch.rand(P, generator=g) * 1e-6
    def one(b):
        b = b.unsqueeze(0); t = time.perf_counter()
        loss = model(input_ids=b, attention_mask=torch.ones_like(b), labels=A.completion_labels(b)).loss; loss.backward()
        vg = torch.cat([p.grad.view(-1) for n_, p in model.named_parameters() if p.grad is not None])
        vg = (0.9 * m + 0.1 * vg) / torch.sqrt(0.999 * v + 0.001 * vg ** 2 + 1e-8); model.zero_grad()
        return vg, time.perf_counter() - t
    one(ids[0]); rows, ts = [], []
    for i in range(1, 9):
        vg, s = one(ids[i]); rows.append(vg); ts.append(s)
    stacked = torch.stack(rows)
    pr = A.BasicProjector(P, 8192, seed=0, block_size=128, dtype=torch.float32)
    pr.project(stacked, max_blocks=1); pr.gen_s, pr.mm_s = [], []
    pr.project(stacked, max_blocks=2)
    per_block = A.med([a + b for a, b in zip(pr.gen_s, pr.mm_s)])
    proj_per_ex = per_block * math.ceil(8192 / 128) / len(rows)
    r = {"examples_per_s": 1.0 / (A.med(ts) + proj_per_ex), "grad_s_per_example": A.med(ts), "proj_s_per_example": proj_per_ex, "P": P}
else:
    r = A.run_task(task)
r["peak_rss_mib"] = A.peak_rss_mib()
print("RESULT " + json.dumps(r))
"""


def run_torch(py, anchor, task, env):
    p = subprocess.run([py, "-c", TORCH_SNIPPET, anchor, task], capture_output=True, text=True, env=env)
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        print(f"torch {task} failed:\n{p.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(line[-1][7:])


def run_dsel(dsel, args, env, out_json):
    wait_idle()
    cmd = [dsel, "bench", *args, "--json", out_json]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    sys.stdout.write(p.stdout)
    if p.returncode != 0:
        print(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.load(open(out_json))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsel", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--anchor", default=os.path.join(os.path.dirname(__file__), "../../shared/bench/torch_anchor.py"))
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--skip-less", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    env = dict(os.environ, ANCHOR_MODEL_DIR=os.path.abspath(a.hf), ANCHOR_DATA_DIR=os.path.abspath(a.data))
    bf16 = bf16_hardware()
    res = {"machine": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t"),
           "bf16_hardware": bf16, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": {}, "dsel": {}}

    torch_tasks = ["matmul" if bf16 else "matmul_f32", "tov_f32", "lora_f32"]
    if bf16:
        torch_tasks.append("tov_bf16_model")
    if not a.skip_less:
        torch_tasks.append("less_r128" if bf16 else "less_r128_f32")
    for t in torch_tasks:
        print(f"== torch {t}", flush=True)
        res["torch"][t] = run_torch(a.python, os.path.abspath(a.anchor), t, env)
        print(json.dumps(res["torch"][t])[:300], flush=True)

    for lib in ["mkl", "openblas", "off"]:
        print(f"== dsel bench gemm, DSEL_BLAS={lib}", flush=True)
        r = run_dsel(a.dsel, ["--only", "gemm", "--model", a.model], dict(env, DSEL_BLAS=lib), os.path.join(a.out, f"dsel-gemm-{lib}.json"))
        res["dsel"][f"gemm_{lib}"] = r
    print("== dsel bench (default backend)", flush=True)
    only = "gemm,shapes,forward,lora" + ("" if a.skip_less else ",less")
    res["dsel"]["full"] = run_dsel(a.dsel, ["--model", a.model, "--only", only], env, os.path.join(a.out, "dsel-full.json"))

    rows = ratios(res, bf16)
    res["ratios"] = rows
    md = ["# dsel vs PyTorch, one run", "", f"Machine: {res['machine']} (bf16 units: {bf16}); {res['date']}; "
          f"2 threads each. Command: `make bench-compare`.", "",
          "| figure | dsel | PyTorch | ratio | target |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['figure']} | {r['dsel']} | {r['torch']} | {r['ratio']} | {r['target']} |")
    text = "\n".join(md) + "\n"
    open(os.path.join(a.out, "compare.md"), "w").write(text)
    json.dump(res, open(os.path.join(a.out, "compare.json"), "w"), indent=1)
    print("\n" + text)


def fmt(x, unit=""):
    return "—" if x is None else f"{x:,.1f}{unit}" if x < 100 else f"{x:,.0f}{unit}"


def ratios(res, bf16):
    t, full = res["torch"], res["dsel"].get("full") or {}
    def get(d, *path):
        for p in path:
            if not isinstance(d, dict) or p not in d:
                return None
            d = d[p]
        return d
    rows = []
    def row(figure, dv, tv, target, unit=""):
        ratio = f"{dv / tv:.2f}×" if dv and tv else "—"
        rows.append({"figure": figure, "dsel": fmt(dv, unit), "torch": fmt(tv, unit), "ratio": ratio, "target": target})
    tm = t.get("matmul") or t.get("matmul_f32") or {}
    gemm = {lib: get(res["dsel"], f"gemm_{lib}", "gemm_f32_gflops") for lib in ["mkl", "openblas", "off"]}
    for lib, v in gemm.items():
        row(f"GEMM 2048³ f32, GFLOP/s ({'candle' if lib == 'off' else lib})", v, get(tm, "f32", "gflops_median") or get(tm, "gflops_median"), "")
    if bf16:
        row("GEMM 2048³ bf16, GFLOP/s", get(full, "gemm_bf16_gflops"), get(tm, "bf16", "gflops_median"), "")
    best = max([v for v in [get(full, "gemm_bf16_gflops"), get(full, "gemm_f32_gflops"), get(tm, "bf16", "gflops_median")] if v] or [0])
    for p in ["f32", "bf16"]:
        mg = get(full, f"model_gemm_{p}_gflops")
        if mg:
            rows.append({"figure": f"model GEMM shapes {p}, GFLOP/s vs best GEMM in this run", "dsel": fmt(mg), "torch": fmt(best),
                         "ratio": f"{mg / best:.2f}×" if best else "—", "target": "≥ 0.80×"})
    fwd_t32 = get(t, "tov_f32", "tokens_per_s_median")
    fwd_t16 = get(t, "tov_bf16_model", "tokens_per_s_median")
    for p in ["f32", "bf16"]:
        v = get(full, f"forward_{p}", "tokens_per_s")
        if v:
            row(f"forward + log-probs 8×256 ({p}) vs PyTorch f32, tokens/s", v, fwd_t32, "≥ 3×")
            if fwd_t16:
                row(f"forward + log-probs 8×256 ({p}) vs PyTorch bf16 weights, tokens/s", v, fwd_t16, "≥ 1.3×")
    for p in ["f32", "bf16"]:
        v = get(full, f"lora_{p}", "tokens_per_s")
        if v:
            row(f"LoRA r=128 AdamW step ({p}) vs PyTorch f32, tokens/s", v, get(t, "lora_f32", "tokens_per_s_median"), "≥ 2×")
    lt = t.get("less_r128") or t.get("less_r128_f32") or {}
    lref = get(lt, "examples_per_s") or get(lt, "projection", "f32", "examples_per_s_total_estimated")
    for p in ["f32", "bf16"]:
        v = get(full, f"less_{p}", "examples_per_s")
        if v:
            row(f"LESS datastore r=128 d=8192 ({p}) vs reference approach, examples/s", v, lref, "≥ 50×")
    for p in ["f32", "bf16"]:
        for k in ["forward", "lora", "less"]:
            m = get(full, f"{k}_{p}", "peak_mib")
            if m:
                rows.append({"figure": f"peak memory, {k} ({p}), MiB", "dsel": fmt(m), "torch": "", "ratio": "", "target": "flat in pool size"})
    return rows


if __name__ == "__main__":
    main()
