"""GPU check: ``compute_vce``'s masked pass through verl 0.9.1's FSDP engine on a tiny Qwen3-VL.

    python benchmarks/gpu_vce_worker_check.py [--device cuda|cpu] [--out runs/gpu_vce_check.json]

On CUDA it first builds verl's real engine (``EngineRegistry.new(language_model, fsdp2)`` + ``initialize``,
1-rank NCCL group, verl's model monkey patches, remove-padding layout); if that fails (e.g. no
flash-attn) the error is recorded and the same VCE code path runs on a bare verl engine object around
the HF model (padded layout) — verl's ``infer_batch``/``forward_backward_batch``/``prepare_model_inputs``
unchanged either way. KL_t / H_t are compared with a float64 full-logits brute force, for scope
'truncated' and 'full'; wall times are reported. Exit code 1 on a mismatch. On CPU only the bare-engine
path runs (what the CPU tests cover). Everything is offline (a tiny random model built on the spot).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _init_dist(device: str) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }.items():
        os.environ.setdefault(k, v)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


def real_fsdp_engine(model_path: Path):
    """verl's FSDP engine as TrainingWorker builds it (forward-only, bf16)."""
    from verl.trainer.config.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, HFModelConfig
    from verl.workers.engine import EngineRegistry

    model_config = HFModelConfig(path=str(model_path), use_remove_padding=True)
    engine_config = FSDPEngineConfig(strategy="fsdp2", forward_only=True)
    engine_config.use_remove_padding = True
    engine = EngineRegistry.new(
        model_type="language_model",
        backend="fsdp2",
        model_config=model_config,
        engine_config=engine_config,
        optimizer_config=None,
        checkpoint_config=CheckpointConfig(),
    )
    engine.initialize()
    return engine


def bare_engine(model):
    import torch
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    eng = object.__new__(FSDPEngineWithLMHead)
    eng.module, eng.pad_to_length, eng.use_ulysses_sp = model, False, False
    eng.ulysses_sequence_parallel_size, eng._autocast_dtype = 1, torch.float32
    eng.get_data_parallel_group = lambda: None
    return eng


def compare(out, expected, spans, atol):
    """Max |error| of KL_t and H_t on the vision-span tokens (scope 'full' also fills the rest)."""
    kl_e, h_e = expected
    worst = 0.0
    rows = zip(out["vce_kl"].unbind(), out["vce_entropy"].unbind(), kl_e, h_e, spans.tolist(), strict=True)
    for got_kl, got_h, ek, eh, (s, e) in rows:
        if s < 0:
            continue
        worst = max(
            worst,
            float((got_kl.float().cpu()[s:e] - ek[s:e]).abs().max()),
            float((got_h.float().cpu()[s:e] - eh[s:e]).abs().max()),
        )
    return worst, worst <= atol


def main(argv=None) -> int:
    import torch

    from vlcal_verl.config import VCEConfig
    from vlcal_verl.testing.tiny_models import build_tiny_vlm, load_tiny_vlm
    from vlcal_verl.verl_ext.check import brute_force_vce, run_engine_vce, tiny_verl_batch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"]
    )
    ap.add_argument("--out", default="runs/gpu_vce_check.json")
    ap.add_argument("--n-samples", type=int, default=6)
    args = ap.parse_args(argv)
    _init_dist(args.device)
    if args.device == "cuda":
        torch.cuda.set_device(0)
    else:
        import verl.utils.device as vdev
        from verl.workers.engine.fsdp import transformer_impl

        vdev.get_device_id = transformer_impl.get_device_id = lambda: "cpu"

    model, proc = load_tiny_vlm("qwen3-vl")
    model = model.to(args.device)
    responses = [
        f"<think><vision> {'a red circle ' * (1 + i)}</vision></think> \\boxed{{{i}}}"
        for i in range(args.n_samples - 1)
    ] + ["no vision block \\boxed{0}"]
    data, rows, spans, mask_ids = tiny_verl_batch(model.cpu(), proc, responses)
    model = model.to(args.device)
    report = {
        "device": args.device,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "runs": [],
    }

    engines = []
    if args.device == "cuda":
        try:
            engines.append(("verl_fsdp2_engine", real_fsdp_engine(build_tiny_vlm("qwen3-vl")), True, 5e-2))
        except Exception:
            report["real_engine_error"] = traceback.format_exc(limit=8)
    engines.append(
        ("bare_engine_hf_model", bare_engine(model), False, 1e-3 if args.device == "cpu" else 5e-3)
    )

    ok_all = True
    for name, eng, rmpad, atol in engines:
        module = getattr(eng.module, "module", eng.module)
        run_engine_vce(
            eng, proc, data, spans, mask_ids, VCEConfig(), args.device, remove_padding=rmpad
        )  # warm-up
        for scope in ("truncated", "full"):
            cfg = VCEConfig(scope=scope, vocab_chunk_tokens=64)
            t0 = time.perf_counter()
            out = run_engine_vce(eng, proc, data, spans, mask_ids, cfg, args.device, remove_padding=rmpad)
            if args.device == "cuda":
                torch.cuda.synchronize()
            t_engine = time.perf_counter() - t0
            t0 = time.perf_counter()
            expected = brute_force_vce(module, proc, rows, spans, mask_ids, cfg)
            t_brute = time.perf_counter() - t0
            worst, ok = compare(out, expected, spans, atol)
            ok_all &= ok
            report["runs"].append(
                {
                    "engine": name,
                    "scope": scope,
                    "max_abs_err": worst,
                    "atol": atol,
                    "ok": ok,
                    "engine_s": round(t_engine, 3),
                    "brute_force_s": round(t_brute, 3),
                }
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("| engine | scope | max abs err | ok | engine s | brute force s |\n|---|---|---|---|---|---|")
    for r in report["runs"]:
        print(
            f"| {r['engine']} | {r['scope']} | {r['max_abs_err']:.2e} | {r['ok']} | {r['engine_s']} | "
            f"{r['brute_force_s']} |"
        )
    if "real_engine_error" in report:
        print("real verl engine failed:\n" + report["real_engine_error"], file=sys.stderr)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
