"""Cost of VCE on verl's engine, relative to verl's own old-log-prob pass (log-probs + entropy).

One run, one Markdown table. A random-weight Qwen3-VL built from a config (no download), a per-sample
(jagged) batch laid out as verl's TransferQueue hands it to the actor (prompt with one image, response,
3-D rope positions), a vision span of ``--span`` tokens starting 8 tokens into the response. Every row
goes through verl 0.9.1's ``FSDPEngineWithLMHead.infer_batch`` (its dynamic-batch micro-batching,
``prepare_model_inputs``, ``forward_step``, output re-ordering) on one rank:

* **plain old-log-prob**: verl's own pass with ``calculate_entropy`` (what ``_compute_old_log_prob``
  runs) — the baseline;
* **separate compute_vce: truncated + exact**: the extra actor call VCE made before fusion (original +
  masked forward of the truncated sequences);
* **fused: truncated + exact**: one call doing verl's pass *and* VCE (verl's forward yields the span
  rows' logits, then one truncated masked forward) — this project's ``variant=exact``;
* **fused: full + sampled (authors' variant)**: verl's pass + one full masked forward, sampled-token
  log-probs only — ``variant=authors``;
* **authors' approach: second full masked log-prob pass**: what their code does — verl's pass run again
  with masked images, then the sampled-token KL.

"× plain" is the **added** time over the plain pass: for the separate rows their own time, for fused
rows (fused − plain). The rows run interleaved, one call of each per round, and the ratio is the median
over rounds of that round's added time / that round's plain time. Memory: on CUDA ``max_memory_allocated`` during the call; on CPU the peak RSS
increase during the call (sampled every 1 ms, glibc mmap threshold pinned to 64 KiB).
Times: ``--warmup`` rounds, then the median of ``--repeats`` rounds.

Usage: ``python benchmarks/vce_cost.py --shape tiny`` or ``--shape small`` (CPU; ``small`` has tiny's tokens and
a network that is not free) or ``--shape qwen3-vl-4b`` (GPU, bf16, sdpa).
Rows whose names start with ``fused`` are the fused calls (a script can read them).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653
SHAPES = {
    # same architecture as the 4B, everything scaled down; tokens scaled by 1/4 (image 448 → 196 image tokens)
    "tiny": dict(
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            mrope_section=[4, 2, 2],
        ),
        vision=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[1],
        ),
        batch=4,
        image=448,
        response=512,
        span=128,
    ),
    # tiny's tokens, a network that is not free: 8 layers × 512 (its weights ≈ ⅓ of the LM head's; the
    # 4B's are ≈ 10×), so what fusion saves — one truncated forward of the network — is measurable on a CPU
    "small": dict(
        text=dict(
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            mrope_section=[16, 8, 8],
        ),
        vision=dict(
            depth=4,
            hidden_size=256,
            intermediate_size=1024,
            num_heads=4,
            num_position_embeddings=64,
            deepstack_visual_indexes=[1, 3],
        ),
        batch=4,
        image=448,
        response=512,
        span=128,
    ),
    "qwen3-vl-4b": dict(
        text=dict(
            hidden_size=2560,
            intermediate_size=9728,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            mrope_section=[24, 20, 20],
        ),
        vision=dict(
            depth=24,
            hidden_size=1024,
            intermediate_size=4096,
            num_heads=16,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[5, 11, 17],
        ),
        batch=4,
        image=896,
        response=2048,
        span=512,
    ),
}


def build_model(shape: dict, device, dtype):
    import torch
    from transformers import AutoModelForImageTextToText, Qwen3VLConfig

    t = dict(shape["text"])
    mrope = t.pop("mrope_section")
    text = dict(
        t,
        vocab_size=151936,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": mrope,
            "mrope_interleaved": True,
        },
    )
    vision = dict(
        shape["vision"],
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=t["hidden_size"],
    )
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    if torch.device(device).type != "cpu":
        inputs_follow_model(model)
    return model.eval()


def inputs_follow_model(model) -> None:
    """Move the forward's tensor arguments to the model's device, as FSDP's root pre-forward does on the
    actor: verl's ``prepare_model_inputs`` leaves ``multi_modal_inputs`` (pixel values) on the host, and
    the bare engine used here has no FSDP wrapper to move them."""
    import torch

    device = next(model.parameters()).device

    def hook(_module, args, kwargs):
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

    model.register_forward_pre_hook(hook, with_kwargs=True)


def make_verl_batch(shape: dict, model, dtype):
    """The per-sample batch verl's actor gets (jagged prompts/responses/ids/positions, multi-modal inputs),
    spans [B, 2] and the mask ids ``{uid}_{session}``."""
    import torch
    from tensordict import NonTensorStack, TensorDict

    from vlcal_verl.verl_ext.nested import nested_rows

    g = torch.Generator().manual_seed(0)
    b, r, patches = shape["batch"], shape["response"], shape["image"] // 16
    n_img = patches * patches // 4
    rows, spans = [], []
    for i in range(b):
        q = torch.randint(0, 150000, (20 + 3 * i,), generator=g).tolist()
        prompt = torch.tensor(
            [151644, 872, 198, VISION_START]
            + [IMAGE_PAD] * n_img
            + [VISION_END, *q, 151645, 198, 151644, 77091, 198]
        )
        resp = torch.randint(0, 150000, (r - 16 * i,), generator=g)
        ids = torch.cat([prompt, resp])
        grid = torch.tensor([[1, patches, patches]])
        mm_tt = (ids == IMAGE_PAD).int()[None]
        vis, _ = model.model.get_rope_index(ids[None], mm_tt, grid, attention_mask=torch.ones_like(ids)[None])
        pos = torch.cat([torch.arange(len(ids))[None], vis[:, 0].cpu()], 0)
        pv = torch.randn(patches * patches, 3 * 2 * 16 * 16, generator=g).to(dtype)
        rows.append({"prompts": prompt, "responses": resp, "input_ids": ids, "position_ids": pos,
                     "mm": {"pixel_values": pv, "image_grid_thw": grid}})  # fmt: skip
        spans.append([8, 8 + shape["span"]])
    data = TensorDict(
        {
            **{
                k: nested_rows([row[k] for row in rows])
                for k in ("prompts", "responses", "input_ids", "position_ids")
            },
            "loss_mask": nested_rows([torch.ones_like(row["responses"]) for row in rows]),
            "multi_modal_inputs": NonTensorStack(*[row["mm"] for row in rows]),
            "uid": NonTensorStack(*[f"u{i}" for i in range(b)]),
            "session_id": NonTensorStack(*[0] * b),
        },
        batch_size=b,
    )
    return data, torch.tensor(spans), [f"u{i}_0" for i in range(b)]


class RssPeak:
    """Peak RSS above the starting RSS, sampled every 1 ms (CPU memory measure)."""

    def __enter__(self):
        import psutil

        self.proc, self.stop, self.peak = psutil.Process(), False, 0
        self.base = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss - self.base)


def measure_one(fn, device) -> tuple[float, float]:
    """(seconds, memory bytes) of one call: CUDA peak allocated, or CPU peak RSS increase."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, float(torch.cuda.max_memory_allocated())
    _trim()
    with RssPeak() as rss:
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
    return seconds, float(rss.peak)


def measure_rounds(fns, device, warmup: int, repeats: int) -> list[tuple[list[float], float]]:
    """Per row, (times of every round, peak memory). The rows run interleaved — one call of each row per
    round — so slow drifts of a shared machine hit every row alike, and a fused row's added time can be
    taken within each round (fused − plain of the same round) instead of between two separate medians."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    mem = [0.0 for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t, m = measure_one(fn, device)
            times[i].append(t)
            mem[i] = max(mem[i], m)
    return list(zip(times, mem, strict=True))


def measure_table(table, device, warmup: int, repeats: int) -> list[dict]:
    """:func:`measure_rounds` over :func:`rows`' table → per row: label, every round's time, the median,
    the added-time ratio (1.0 for plain) and the peak memory (bytes)."""
    results = measure_rounds([fn for _, fn, _ in table], device, warmup, repeats)
    plain_times = results[0][0]
    out = []
    for (label, _, includes_plain), (times, mem) in zip(table, results, strict=True):
        ratio = 1.0 if label.startswith("plain") else added_ratio(times, plain_times, includes_plain)
        out.append(dict(label=label, times=times, median_s=statistics.median(times), ratio=ratio, mem=mem))
    return out


def added_ratio(times: list[float], plain: list[float], includes_plain: bool) -> float:
    """VCE's added time as a multiple of plain: median over rounds of (row − plain) / plain for the fused
    calls (they include verl's pass), of row / plain for the separate calls."""
    per_round = [((t - p) if includes_plain else t) / p for t, p in zip(times, plain, strict=True)]
    return statistics.median(per_round)


def _trim():
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def black():
    """The pixel_values row of a black patch under Qwen3-VL's normalisation (mean = std = 0.5; temporal
    patch 2, patch 16): what a masked cell becomes."""
    from vlcal_verl.vce_mask import black_row

    return black_row([0.5] * 3, [0.5] * 3, 2, 16)


def verl_settings(batch, max_tokens: int):
    """A shallow copy of ``batch`` with the settings verl's ``_compute_old_log_prob`` puts on it (packed
    layout, dynamic batching at ``max_tokens`` per micro-batch, entropy on)."""
    from verl.utils import tensordict_utils as tu

    batch = batch.clone(recurse=False)
    tu.assign_non_tensor(
        batch, use_remove_padding=True, use_dynamic_bsz=True, temperature=1.0, calculate_entropy=True,
        max_token_len_per_gpu=max_tokens,
    )  # fmt: skip
    return batch


def fused_call(eng, data, spans, mask_ids, cfg, max_tokens: int, device):
    """One verl ``infer_batch`` with VCE fused in: verl's log-probs / entropy and the VCE fields."""
    from vlcal_verl.verl_ext.vce_fused import add_vce_targets, fused_forward_installed

    batch = verl_settings(data, max_tokens)
    add_vce_targets(batch, spans, cfg, mask_ids)
    with fused_forward_installed(eng, cfg, black(), 2, device=device):
        return eng.infer_batch(batch, loss_function=None)["model_output"]


def rows(model, data, spans, mask_ids, args, device):
    """(label, callable) per row; every callable runs one verl ``infer_batch``."""
    import torch

    from vlcal_verl.config import VCEConfig
    from vlcal_verl.token_signals import sampled_kl
    from vlcal_verl.verl_ext.check import bare_engine
    from vlcal_verl.verl_ext.vce_engine import (
        mask_multi_modal_inputs,
        prepare_vce_batch,
        vce_forward_installed,
    )

    black_px = black()
    eng = bare_engine(model, torch.float32 if args.dtype_obj == torch.float32 else args.dtype_obj)
    max_tokens = int(data["input_ids"].offsets().diff().max()) * args.per_micro

    def settings(batch):
        return verl_settings(batch, max_tokens)

    def plain():
        return eng.infer_batch(settings(data), loss_function=None)["model_output"]

    exact = VCEConfig(scope="truncated", estimator="exact", vocab_chunk_tokens=args.chunk)
    authors = VCEConfig(scope="full", estimator="reference", entropy="nll", vocab_chunk_tokens=args.chunk)

    def separate():
        prepared = settings(prepare_vce_batch(data, spans, exact, black_px, 2, mask_ids))
        with vce_forward_installed(eng, exact, device=device):
            return eng.infer_batch(prepared, loss_function=None)["model_output"]

    def fused(cfg):
        return lambda: fused_call(eng, data, spans, mask_ids, cfg, max_tokens, device)

    old = plain()["log_probs"]

    def authors_approach():
        masked = data.clone(recurse=False)
        mm = mask_multi_modal_inputs(list(data["multi_modal_inputs"]), mask_ids, authors, black_px, 2)
        from tensordict import NonTensorStack

        masked["multi_modal_inputs"] = NonTensorStack(*mm)
        aug = eng.infer_batch(settings(masked), loss_function=None)["model_output"]["log_probs"]
        for o, a in zip(old.unbind(), aug.unbind(), strict=True):
            sampled_kl(o, a, "reference")

    return [
        ("plain old-log-prob (verl: log-probs + entropy)", plain, False),
        ("separate compute_vce: truncated + exact", separate, False),
        ("fused: truncated + exact", fused(exact), True),
        ("fused: full + sampled (authors' variant)", fused(authors), True),
        ("authors' approach: second full masked log-prob pass", authors_approach, False),
    ]


def init_single_rank(device) -> None:
    """One-rank process group (verl's micro-batching all-reduces token counts over the DP group) and verl's
    device helpers pointed at ``device`` (its step moves each micro-batch to "the" accelerator)."""
    import socket

    import torch
    import torch.distributed as dist
    from verl.workers.engine.fsdp import transformer_impl

    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device.index)
        dev_id = torch.cuda.current_device()  # "cuda" alone has no index
    else:
        dev_id = "cpu"
    transformer_impl.get_device_id = lambda: dev_id
    transformer_impl.get_device_name = lambda: device.type


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=256, help="vce.vocab_chunk_tokens")
    ap.add_argument(
        "--per-micro", type=int, default=2, help="samples per micro-batch (dynamic batching budget)"
    )
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--response", type=int, default=None)
    ap.add_argument("--span", type=int, default=None)
    ap.add_argument("--image", type=int, default=None)
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    args = ap.parse_args(argv)

    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")  # verl's optional-engine import warnings
    logging.disable(logging.WARNING)
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: big frees go back to the OS
    shape = dict(SHAPES[args.shape])
    for k in ("batch", "response", "span", "image"):
        if getattr(args, k) is not None:
            shape[k] = getattr(args, k)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else torch.bfloat16
        if device.type == "cuda"
        else torch.float32
    )
    args.dtype_obj = dtype
    init_single_rank(device)
    model = build_model(shape, device, dtype)
    data, spans, mask_ids = make_verl_batch(shape, model, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} threads)"
    p = int(data["prompts"].offsets().diff()[0])
    print(
        f"# VCE cost on verl's engine, shape={args.shape}, device={name}, dtype={dtype}, torch {torch.__version__}\n"
    )
    print(
        f"B={shape['batch']}, image {shape['image']}×{shape['image']} ({(shape['image'] // 32) ** 2} image "
        f"tokens), prompt ~{p} tokens, response ≤ {shape['response']}, vision span {shape['span']} "
        f"(tokens 8..{8 + shape['span']}), vocab 151936, chunk {args.chunk}, {args.per_micro} samples per "
        f"micro-batch, packed layout; median of {args.repeats} interleaved rounds after {args.warmup} warm-up\n"
    )
    mem_name = "peak allocated (GiB)" if device.type == "cuda" else "peak RSS increase (MiB)"
    unit = 2**30 if device.type == "cuda" else 2**20
    print(f"| row | time (s) | × plain | {mem_name} |\n|---|---:|---:|---:|")
    table = rows(model, data, spans, mask_ids, args, device)
    for r in measure_table(table, device, args.warmup, args.repeats):
        print(
            f"| {r['label']} | {r['median_s']:.3f} | {r['ratio']:.2f} | {r['mem'] / unit:.2f} |", flush=True
        )
    print("\n'× plain': the time VCE adds to verl's old-log-prob pass, as a multiple of that pass.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
