"""Cost of VCE relative to the plain log-prob + entropy forward that verl's ``old_log_prob`` runs.

One run, one Markdown table. A random-weight Qwen3-VL built from a config (no download), a batch laid
out like verl's (left-padded prompt with one image + right-padded response), a vision span of
``--span`` tokens starting ``--span-start`` tokens into the response (where ``<vision>`` opens).

Rows (every VCE row times only the *extra* work VCE adds on top of the plain forward):

* **plain**: ``model(...)`` full logits → verl's ``logprobs_from_logits`` + ``entropy_from_logits`` on
  the response (what ``old_log_prob`` computes).
* **plain + capture**: the same with :func:`vlcal_verl.vce.capture_response_hidden` (keeps the final
  hidden states [B, R, d] that the VCE rows reuse as the original distribution).
* **authors**: mask the image, run the *full* masked forward with full logits, log-probs of the
  response, ``reference`` estimator on the span (their pipeline).
* **ours exact / k3, truncated**: :func:`vlcal_verl.vce.compute_vce_signals` with the captured hidden
  states: masked forward cut at the span end, lm_head only on span rows, exact KL in chunks.
* **ours exact, truncated, standalone**: without captured states (a second truncated forward for the
  original image) — what an engine pays if it cannot hook its log-prob forward.
* **ours exact, full**: the whole response (needed by TAR scope 'response').

Memory: on CUDA ``torch.cuda.max_memory_allocated`` over the call (absolute, weights included) after
``reset_peak_memory_stats``; on CPU the peak resident set size (sampled every 1 ms by a thread, glibc
mmap threshold pinned to 64 KiB so freed tensors return to the OS) minus the RSS before the call.
Times: ``--warmup`` calls, then the median of ``--repeats`` (CUDA synchronised).

Usage: ``python benchmarks/vce_cost.py --shape tiny`` (CPU) or ``--shape qwen3-vl-4b`` (GPU, bf16, sdpa).
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
    return model.eval()


def make_batch(shape: dict, device, dtype):
    """verl layout: [prompt (one image, left-padded) | response (right-padded)], plus spans."""
    import torch

    g = torch.Generator().manual_seed(0)
    b, r, patches = shape["batch"], shape["response"], shape["image"] // 16
    n_img = patches * patches // 4
    prompts = []
    for i in range(b):  # variable question lengths → left padding
        q = torch.randint(0, 150000, (20 + 3 * i,), generator=g).tolist()
        prompts.append(
            [151644, 872, 198, VISION_START]
            + [IMAGE_PAD] * n_img
            + [VISION_END, *q, 151645, 198, 151644, 77091, 198]
        )
    p = max(map(len, prompts))
    ids = torch.full((b, p + r), 151643, dtype=torch.long)
    att = torch.zeros(b, p + r, dtype=torch.long)
    resp_lens = [r - 16 * i for i in range(b)]
    responses = torch.full((b, r), 151643, dtype=torch.long)
    for i, (pr, rl) in enumerate(zip(prompts, resp_lens, strict=True)):
        ids[i, p - len(pr) : p] = torch.tensor(pr)
        att[i, p - len(pr) : p + rl] = 1
        responses[i, :rl] = torch.randint(0, 150000, (rl,), generator=g)
    ids[:, p:] = responses
    mm = (ids == IMAGE_PAD).int()
    rows = b * patches * patches
    batch = {
        "input_ids": ids,
        "attention_mask": att,
        "responses": responses,
        "response_mask": att[:, p:],
        "mm_token_type_ids": mm,
        "image_grid_thw": torch.tensor([[1, patches, patches]] * b),
        "pixel_values": torch.randn(rows, 3 * 2 * 16 * 16, generator=g),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    batch["uid"] = [f"sample-{i}" for i in range(b)]
    start = shape.get("span_start", 8)
    spans = [(start, start + shape["span"])] * b
    return batch, spans


MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def plain_logprob_entropy(model, batch):
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    r = batch["responses"].shape[1]
    logits = model(**{k: batch[k] for k in MODEL_KEYS}, use_cache=False).logits
    logits = logits[:, -r - 1 : -1]
    return logprobs_from_logits(logits, batch["responses"]), entropy_from_logits(logits)


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


def measure(fn, device, warmup: int, repeats: int) -> tuple[float, float]:
    """(median seconds, memory bytes): CUDA peak allocated, or CPU peak RSS increase."""
    import torch

    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, mem = [], 0.0
    for _ in range(repeats):
        if not cuda:
            _trim()
            with RssPeak() as rss:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            mem = max(mem, rss.peak)
        else:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    if cuda:
        mem = torch.cuda.max_memory_allocated()
    return statistics.median(times), mem


def _trim():
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rows(model, batch, spans, args):
    import torch

    from vlcal_verl.config import VCEConfig
    from vlcal_verl.vce import capture_response_hidden, compute_vce_signals
    from vlcal_verl.vce_mask import batch_cell_masks, black_row, mask_pixel_values

    black = black_row([0.5] * 3, [0.5] * 3, 2, 16)
    r = batch["responses"].shape[1]
    with torch.no_grad(), capture_response_hidden(model, r) as store:
        old_logp, _ = plain_logprob_entropy(model, batch)
    hidden = store["hidden"]

    def plain():
        with torch.no_grad():
            plain_logprob_entropy(model, batch)

    def plain_capture():
        with torch.no_grad(), capture_response_hidden(model, r):
            plain_logprob_entropy(model, batch)

    def authors():
        from verl.utils.torch_functional import logprobs_from_logits

        with torch.no_grad():
            masks = batch_cell_masks(batch["image_grid_thw"], [1] * len(spans), batch["uid"], 0.8, 0, 2)
            pv = mask_pixel_values(batch["pixel_values"], batch["image_grid_thw"], masks, 2, black)
            logits = model(
                **{k: batch[k] for k in MODEL_KEYS if k != "pixel_values"}, pixel_values=pv, use_cache=False
            ).logits[:, -r - 1 : -1]
            aug = logprobs_from_logits(logits, batch["responses"])
            s, e = spans[0]
            # the reference estimator needs only the two log-probs of y_t
            d = (old_logp[:, s:e] - aug[:, s:e]).float().clamp(-20, 20)
            (old_logp[:, s:e].float().exp() * d).clamp(0, 10).mean(-1)

    def ours(estimator="exact", scope="truncated", reuse=True):
        cfg = VCEConfig(estimator=estimator, scope=scope, vocab_chunk_tokens=args.chunk)
        return lambda: compute_vce_signals(
            model, batch, spans, cfg, black=black, orig_hidden=hidden if reuse else None
        )

    return [
        ("plain log-prob + entropy (verl old_log_prob)", plain),
        ("plain + capture of span hidden states", plain_capture),
        ("authors: full masked forward + reference", authors),
        ("ours: truncated + exact KL (chunked)", ours()),
        ("ours: truncated + k3", ours("k3")),
        ("ours: truncated + exact, standalone (2 fwd)", ours(reuse=False)),
        ("ours: full + exact (TAR scope response)", ours(scope="full")),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=256, help="vce.vocab_chunk_tokens")
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
    model = build_model(shape, device, dtype)
    batch, spans = make_batch(shape, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} threads)"
    p = batch["input_ids"].shape[1] - shape["response"]
    print(f"# VCE cost, shape={args.shape}, device={name}, dtype={dtype}, torch {torch.__version__}\n")
    print(
        f"B={shape['batch']}, image {shape['image']}×{shape['image']} ({(shape['image'] // 32) ** 2} image "
        f"tokens), prompt {p} tokens, response {shape['response']}, vision span {shape['span']} "
        f"(starts at token {spans[0][0]}), vocab 151936, chunk {args.chunk}; truncated masked input "
        f"{p + spans[0][1] - 1} of {p + shape['response']} columns; median of {args.repeats} after "
        f"{args.warmup} warm-up\n"
    )
    mem_name = "peak allocated (GiB)" if device.type == "cuda" else "peak RSS increase (MiB)"
    unit = 2**30 if device.type == "cuda" else 2**20
    print(f"| row | time (s) | × plain | {mem_name} |\n|---|---:|---:|---:|")
    base = None
    for label, fn in rows(model, batch, spans, args):
        t, mem = measure(fn, device, args.warmup, args.repeats)
        base = base or t
        print(f"| {label} | {t:.3f} | {t / base:.2f} | {mem / unit:.2f} |", flush=True)
    print("\nVCE rows time only the extra VCE work; '× plain' for them is the added cost of VCE.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
