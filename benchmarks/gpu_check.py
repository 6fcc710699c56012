"""One check for a lent GPU (one H200, 15 device minutes a task): VCE's cost at the 4B shape, the fused
pass's numerics in bf16, and the loss path on CUDA — prepared so that the first call spends its minutes
on measurements, not on an import error.

    bash benchmarks/gpu_wheels.sh            # here: the wheels the device image lacks → .whl/
    bash benchmarks/gpu_check.sh             # there (carry .whl): installs them, runs this file
    python benchmarks/gpu_check.py --device cpu --shape small    # the CPU rehearsal

Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out`` (default ``$OUT``, else runs/gpu_check) after
every part, and prints the Markdown last. Exit 0: every comparison within its tolerance; 1: a mismatch;
2: bad arguments; 3: a part raised (its traceback is in the JSON).

1. **cost** — :mod:`vce_cost`'s five rows (plain old-log-prob, separate ``compute_vce``, fused exact,
   fused authors', the authors' second full masked pass) through verl's ``FSDPEngineWithLMHead.infer_batch``
   on a random-weight Qwen3-VL, interleaved rounds; time added × plain and peak memory.
2. **numerics** — the fused call's KL_t / H_t / log p_masked (and verl's own log-probs / entropy from the
   same call) against a float64 brute force: the same weights upcast to float64, full-sequence forwards of
   each sample with the original and the masked image, float64 log-softmax. Tolerance: the RMS error must
   stay within 3× that of a *naive* computation in the run's dtype (the same per-sample forwards in bf16,
   float64 arithmetic on its logits) + 1e-4. bf16 rounds every activation (~3 significant digits), so no
   fixed bound fits a 36-layer network; the naive path measures that noise on these very inputs, and a
   wrong row, mask or chunk gives errors of the size of the values themselves. 1e-4 covers float32
   arithmetic over 151,936 logits (~1e-5) in float32 runs. A field returned in a coarser dtype may also
   be off by 2 units of that dtype: verl's pure-PyTorch log-softmax and entropy (no flash-attn on the
   device) run in the logits' bf16, ~0.1 at |log p| ≈ 12, where VCE's float32 arithmetic on the same
   logits stays at the naive path's error. Then the exact estimator's chunking at the real
   vocabulary: ``vocab_chunk_tokens`` 256 / 100 / one chunk must agree within 1e-4 + 2× the spread of two
   identical calls (float32 sums over 151,936 logits in different shapes), with each call's peak memory.
3. **loss** — the perception filter inside verl's ``ppo_loss`` (loss, metrics, gradient) and TAR's
   advantages on device tensors against the same calls on CPU tensors, fed with part 2's VCE outputs.

Parts 2 and 3 live in ``gpu_check_numerics.py`` and ``gpu_check_loss.py`` beside this file.

**Ray import shim (this benchmark alone).** ``verl/__init__`` imports ``verl.protocol``, which imports
Ray at module level and uses it at import time only to annotate a dataclass field (``ray.ObjectRef``).
The device image has no Ray and its wheel alone exceeds what may travel, so when ``ray`` is not
importable :func:`install_ray_shim` registers a stand-in module holding only that class; any other
attribute raises. Nothing this check runs calls Ray. The package's runtime code never does this.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
PARTS = ("cost", "numerics", "loss")


def install_ray_shim() -> bool:
    """Register the stand-in ``ray`` module (see the module docstring) when Ray is not installed."""
    if "ray" in sys.modules or importlib.util.find_spec("ray") is not None:
        return False
    shim = types.ModuleType("ray", "gpu_check's stand-in: Ray is not installed here")
    shim.__spec__ = importlib.machinery.ModuleSpec("ray", None)
    shim.ObjectRef = type("ObjectRef", (), {"__module__": "ray"})

    def missing(name: str):
        raise AttributeError(f"ray.{name}: Ray is not installed; gpu_check's import shim has only ObjectRef")

    shim.__getattr__ = missing
    sys.modules["ray"] = shim
    return True


def parse_args(argv):
    import vce_cost

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--shape", choices=sorted(vce_cost.SHAPES), default="qwen3-vl-4b")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bf16 on CUDA")
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=256, help="vce.vocab_chunk_tokens of the rows")
    ap.add_argument("--per-micro", type=int, default=2, help="samples per micro-batch")
    for k in ("batch", "response", "span", "image"):
        ap.add_argument(f"--{k}", type=int, default=None)
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        ap.exit(2, f"gpu_check: --parts {args.parts!r}: choose from {','.join(PARTS)}\n")
    if args.warmup < 0 or args.repeats < 1 or args.chunk < 1 or args.per_micro < 1:
        ap.exit(2, "gpu_check: --warmup must be >= 0 and --repeats, --chunk, --per-micro >= 1\n")
    if any((getattr(args, k) or 1) < 1 for k in ("batch", "response", "span", "image")):
        ap.exit(2, "gpu_check: --batch, --response, --span and --image must be >= 1\n")
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device != "cpu" and not args.device.startswith("cuda"):
        ap.exit(2, f"gpu_check: --device {args.device!r}: use cuda, cuda:N or cpu\n")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.exit(2, f"gpu_check: --device {args.device} but torch {torch.__version__} sees no CUDA device\n")
    if args.device == "cpu" and args.shape == "qwen3-vl-4b":
        ap.exit(2, "gpu_check: --shape qwen3-vl-4b needs a GPU (its float64 copy alone is 35 GB); "
                   "rehearse on the CPU with --shape small or tiny\n")  # fmt: skip
    args.parts = parts
    return args


def environment(device, dtype, shim: bool) -> dict:
    import importlib.metadata as md

    import torch

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()})",
        "dtype": str(dtype),
        "ray_import_shim": shim,
        "verl_file": getattr(sys.modules.get("verl"), "__file__", None),
        **{p: version(p) for p in ("torch", "transformers", "verl", "tensordict", "datasets", "omegaconf")},
    }
    if device.type == "cuda":
        env |= {
            "cuda": torch.version.cuda,
            "memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1),
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    return env


def part_cost(ctx) -> dict:
    """vce_cost's rows, measured as vce_cost measures them (interleaved rounds)."""
    import torch
    import vce_cost

    table = vce_cost.rows(ctx.model, ctx.data, ctx.spans, ctx.mask_ids, ctx.args, ctx.device)
    resident = torch.cuda.memory_allocated(ctx.device) if ctx.device.type == "cuda" else 0.0
    rows = vce_cost.measure_table(table, ctx.device, ctx.args.warmup, ctx.args.repeats)
    return {"resident_bytes": resident, "rows": rows, "ok": True}


def markdown(report: dict) -> str:
    env, lines = report["env"], []
    lines.append(f"# gpu_check: {env['device']}, {env['dtype']}, shape {report['args']['shape']}, "
                 f"torch {env['torch']}, transformers {env['transformers']}, verl {env['verl']}\n")  # fmt: skip
    cost = report.get("cost")
    if cost and "rows" in cost:
        gib = 2**30 if report["args"]["device"].startswith("cuda") else 2**20
        unit = "GiB" if gib == 2**30 else "MiB (RSS increase)"
        lines += [f"| row | time (s) | × plain | peak ({unit}) |", "|---|---:|---:|---:|"]
        lines += [f"| {r['label']} | {r['median_s']:.3f} | {r['ratio']:.2f} | {r['mem'] / gib:.2f} |"
                  for r in cost["rows"]]  # fmt: skip
        lines.append("")
    num = report.get("numerics")
    if num and "fields" in num:
        lines += ["| field vs float64 | tokens | RMS err | naive RMS err | tol | rel L2 | max abs | ok |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for f in num["fields"]:
            if "error" in f:
                lines.append(f"| {f['field']} | – | – | – | – | – | – | {f['error']} |")
                continue
            lines.append(f"| {f['field']} | {f['tokens']} | {f['rms']:.2e} | {f['naive_rms']:.2e} | {f['tol']:.2e} "
                         f"| {f['rel_l2']:.2e} | {f['max_abs']:.2e} | {f['ok']} |")  # fmt: skip
        lines += ["", "| exact estimator, chunk | max abs diff vs base | tol | time (s) | peak above resident |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        lines += [f"| {c['run']} ({c['chunk']}) | {c['max_abs_diff']:.2e} | {c['tol']:.2e} | {c['seconds']:.3f} "
                  f"| {c['peak_above_resident'] / 2**20:.0f} MiB |" for c in num["chunks"]]  # fmt: skip
        lines.append("")
    loss = report.get("loss")
    if loss and "checks" in loss:
        lines += [f"| {loss['versus']} | max abs diff | tol | ok |", "|---|---:|---:|---|"]
        lines += [
            f"| {c['name']} | {c['max_abs_diff']:.2e} | {c['tol']:.1e} | {c['ok']} |" for c in loss["checks"]
        ]
        lines.append("")
    for part, res in report.items():
        if isinstance(res, dict) and "exception" in res:
            lines.append(f"**{part} raised:** `{res['exception'].strip().splitlines()[-1]}`")
    lines.append(f"ok: {report['ok']}, {report['elapsed_s']:.0f} s")
    return "\n".join(lines)


def setup(args):
    """Model, batch and verl engine of the run (shared by the parts)."""
    import torch
    import vce_cost

    from vlcal_verl.verl_ext.check import bare_engine

    device = torch.device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else torch.bfloat16
        if device.type == "cuda"
        else torch.float32
    )
    shape = dict(vce_cost.SHAPES[args.shape])
    shape.update({k: getattr(args, k) for k in ("batch", "response", "span", "image") if getattr(args, k)})
    args.dtype_obj = dtype  # what vce_cost.rows reads
    vce_cost.init_single_rank(device)
    model = vce_cost.build_model(shape, device, dtype)
    data, spans, mask_ids = vce_cost.make_verl_batch(shape, model, dtype)
    engine = bare_engine(model, dtype)
    max_tokens = int(data["input_ids"].offsets().diff().max()) * args.per_micro
    return types.SimpleNamespace(args=args, device=device, dtype=dtype, shape=shape, model=model, data=data,
                                 spans=spans, mask_ids=mask_ids, engine=engine, max_tokens=max_tokens)  # fmt: skip


def write_json(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))


def write(report: dict, out: Path) -> None:
    write_json(report, out)
    (out / "gpu_check.md").write_text(markdown(report) + "\n")


def main(argv=None) -> int:
    t0 = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    shim = install_ray_shim()
    import logging
    import warnings

    warnings.filterwarnings("ignore")  # verl's optional-engine import warnings
    logging.disable(logging.WARNING)
    from gpu_check_loss import part_loss
    from gpu_check_numerics import part_numerics

    out = Path(args.out)
    try:
        ctx = setup(args)
    except Exception:
        report = {"args": vars(args), "setup": {"ok": False, "exception": traceback.format_exc()}}
        write_json(report, out)
        print(f"[gpu_check] setup raised:\n{report['setup']['exception']}", file=sys.stderr)
        return 3
    report = {"args": {k: v for k, v in vars(args).items() if k != "dtype_obj"}, "shape": ctx.shape,
              "env": environment(ctx.device, ctx.dtype, shim), "ok": True, "elapsed_s": 0.0}  # fmt: skip
    runners = {"cost": part_cost, "numerics": part_numerics, "loss": part_loss}
    crashed = False
    for part in args.parts:
        t = time.perf_counter()
        try:
            report[part] = runners[part](ctx)
        except Exception:
            report[part] = {"ok": False, "exception": traceback.format_exc()}
            crashed = True
        report[part]["seconds"] = round(time.perf_counter() - t, 1)
        report["ok"] = report["ok"] and report[part]["ok"]
        report["elapsed_s"] = time.perf_counter() - t0
        write(report, out)
        print(f"[gpu_check] {part}: ok={report[part]['ok']} ({report[part]['seconds']} s)", flush=True)
    print(markdown(report), flush=True)
    for part in args.parts:
        if "exception" in report[part]:
            print(f"[gpu_check] {part} raised:\n{report[part]['exception']}", file=sys.stderr)
    return 3 if crashed else 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
