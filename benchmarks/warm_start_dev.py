"""Warm-start settings compared on the training split only: fit on the recipe's training items, sample
training-split items whose images the fit never shows.

Fit is exactly what ``vlcal train`` warm-starts on: the recipe's ``train_size`` training items
(``load_demo_data`` as ``prepare_assets`` builds them, in its order), so the recipe's own row is the
science run's warm start. Dev is the next 200 items of the same seeded train-split order whose image no
fit item shows (easy-vqa asks several questions per image; an image seen in fit would let memory pass
for sight). Held-out items are never loaded (``eval_size`` 0: easy-vqa's test split is never read).
Each setting is warm-started on fit with the project's ``warm_start`` (the arguments
``warm_started_model`` passes) and dev is sampled with ``generate_hf`` at the recipe's evaluation
temperature, scored by ``score_generations`` and judged by the exact easy-vqa judge. One Markdown row per
setting, in the columns of README "Choosing the warm start on the training split", plus the share of dev
descriptions naming the right colour / shape and the last loss.

    python benchmarks/warm_start_dev.py --steps 2000 --lr 3e-3                # one setting
    python benchmarks/warm_start_dev.py --setting steps=1000,image_size=64 \\
        --setting steps=1000,vision_depth=4                                  # rows side by side
    python benchmarks/warm_start_dev.py --model runs/science/warm_start      # a saved warm start, dev only

``--setting`` keys: steps, lr, batch, image_size, rlcr_fraction, train_size, vision_depth, vision_width (the tiny
Qwen-VL vision tower; 0 keeps the builder's), init_seed (the model's initialisation and the warm start's
batch order; the data stay the recipe's); unset keys take the flags' values, whose defaults are the
recipe's ``demo:`` block.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEV = 200
KEYS = {"steps": int, "lr": float, "batch": int, "image_size": int, "rlcr_fraction": float, "train_size": int}
KEYS |= {"vision_depth": int, "vision_width": int, "init_seed": int}
COLUMNS = (
    "what colour", "what shape", "yes/no colour", "yes/no shape", "z_vis correct", "AUROC(Φ)",
    "desc. colour / shape right", "last loss", "s",
)  # fmt: skip
QTYPES = ("question: colour", "question: shape", "question: yes/no (colour)", "question: yes/no (shape)")


def fit_dev_items(train_size: int, seed: int, image_size: int) -> tuple[list[Any], list[Any]]:
    """The recipe's training items as ``prepare_assets`` loads them (fit) and the 200 training-split items
    after them whose image no fit item shows (dev): ``load_dev_data``, the split ``science.evaluate_on: dev``
    evaluates on; no held-out item is read."""
    from vlcal_verl.demo.data import load_dev_data

    data = load_dev_data(train_size, DEV, seed, image_size)
    return data.train, data.eval


def parse_setting(text: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """``"steps=1000,lr=3e-3"`` over ``defaults`` → a full setting (ValueError naming an unknown key)."""
    out = dict(defaults)
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in KEYS:
            raise ValueError(f"unknown setting key {key!r} (known: {', '.join(KEYS)})")
        out[key] = KEYS[key](value)
    return out


def label(setting: dict[str, Any], defaults: dict[str, Any]) -> str:
    """The row's name: steps and lr always, the other keys where they differ from the recipe's."""
    extra = [f"{k} {v}" for k, v in setting.items() if k not in ("steps", "lr") and v != defaults[k]]
    return ", ".join([f"{setting['steps']} steps, lr {setting['lr']:g}", *extra])


def tiny_model(dc: Any, setting: dict[str, Any]):
    """The recipe's tiny model (``load_tiny_vlm``), or the same family with another vision tower; the
    processor's pixel budget is raised to hold ``image_size``² (the builder's is 128²)."""
    import torch

    from vlcal_verl.testing import tiny_models as tm

    torch.manual_seed(setting["init_seed"])  # as warm_started_model does (with the recipe's seed)
    if setting["vision_depth"] or setting["vision_width"]:
        from transformers import AutoModelForImageTextToText

        config, processor = tm._qwen_family_config(dc.model_family, dc.tokenizer)
        vision = config.vision_config
        if setting["vision_depth"]:
            vision.depth = setting["vision_depth"]
        if setting["vision_width"]:
            vision.hidden_size, vision.intermediate_size = (
                setting["vision_width"],
                2 * setting["vision_width"],
            )
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    else:
        model, processor = tm.load_tiny_vlm(dc.model_family, seed=dc.seed, tokenizer=dc.tokenizer)
    pixels = setting["image_size"] ** 2
    ip = processor.image_processor
    if pixels > ip.size["longest_edge"]:
        ip.size["longest_edge"] = ip.max_pixels = pixels  # SizeDict (transformers 5) or dict
    return model, processor


def dev_row(model, processor, dev: list[Any], dc: Any, max_new_tokens: int, protocol: str) -> dict[str, Any]:
    """Sample dev as ``vlcal eval`` does (HF backend) in ``protocol``'s layout, score, judge z_vis (RLCR:
    the first sentence of ``<think>``, as the science report does); the row's numbers."""
    from vlcal_verl.evaluation.generate import GenerationSettings, generate_hf, score_generations
    from vlcal_verl.evaluation.visual_judge import judge_item, named_attributes, uid_attributes
    from vlcal_verl.metrics import auroc
    from vlcal_verl.protocol import parse_response
    from vlcal_verl.science.report import attribute_accuracy, rlcr_think_description

    settings = GenerationSettings(
        max_new_tokens=max_new_tokens,
        temperature=dc.eval_temperature,
        batch_size=dc.eval_batch_size,
        seed=dc.seed,
        protocol=protocol,
    )
    gens = generate_hf(model, processor, dev, settings)
    rows = [
        {"uid": it.uid, "question": it.question, "ground_truth": it.answer, "answer_kind": it.kind,
         "response": g.text, "truncated": g.truncated, "n_tokens": g.n_tokens}
        for it, g in zip(dev, gens, strict=True)
    ]  # fmt: skip
    records = score_generations(rows, protocol)
    acc = attribute_accuracy(records)
    conf = [r["confidence"] if r["confidence"] is not None else 0.0 for r in records]
    colour_ok = shape_ok = seen = 0
    for r in records:
        text = r["response"]
        vision = rlcr_think_description(text) if protocol == "rlcr" else parse_response(text).vision
        judged = judge_item(r["uid"], vision)
        seen += judged is not None and judged.visual_correct == 1
        colour, shape = uid_attributes(r["uid"])
        named = named_attributes(vision or "")
        colour_ok += named[0] == (colour,)
        shape_ok += named[1] == (shape,)
    return {
        **{q: acc.get(q, {}).get("accuracy") for q in QTYPES},
        "counts": {q: acc.get(q, {}).get("n", 0) for q in QTYPES},
        "z_vis correct": seen,
        "AUROC(Φ)": auroc(conf, [r["correct"] for r in records]),
        "colour right": colour_ok / len(records),
        "shape right": shape_ok / len(records),
    }


def saved_model(model_dir: str):
    """(model, processor, losses) of a warm start saved by ``warm_started_model``."""
    import json

    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    losses_file = Path(model_dir) / "warm_start_losses.json"
    losses = json.loads(losses_file.read_text()) if losses_file.exists() else []
    return model, AutoProcessor.from_pretrained(model_dir), losses


def run_setting(
    dc: Any, setting: dict[str, Any], max_new_tokens: int, layouts: list[str], model_dir: str | None = None
) -> list[dict]:
    """Warm start on fit (or load ``model_dir``), then one row per layout (protocol) dev is sampled in; the
    first has the seconds."""
    from vlcal_verl.demo.warm_start import warm_start

    t0 = time.perf_counter()
    fit, dev = fit_dev_items(setting["train_size"], dc.seed, setting["image_size"])
    shared = len({it.image.tobytes() for it in fit} & {it.image.tobytes() for it in dev})
    print(f"fit {len(fit)} items, dev {len(dev)}; dev images also in fit: {shared}", flush=True)
    if model_dir:
        model, processor, losses = saved_model(model_dir)
    else:
        model, processor = tiny_model(dc, setting)
        losses = warm_start(
            model,
            processor,
            fit,
            steps=setting["steps"],
            batch_size=setting["batch"],
            lr=setting["lr"],
            weight_decay=0.0,
            grad_clip=1.0,
            seed=setting["init_seed"],
            rlcr_fraction=setting["rlcr_fraction"],
        )
    rows = [dev_row(model, processor, dev, dc, max_new_tokens, protocol) for protocol in layouts]
    for row in rows:
        row["last loss"] = sum(losses[-50:]) / max(len(losses[-50:]), 1) if losses else float("nan")
    rows[0]["s"] = time.perf_counter() - t0
    return rows


def cells(row: dict[str, Any]) -> list[str]:
    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    return [
        *(f(row[q]) for q in QTYPES),
        f"{row['z_vis correct']}/{DEV}",
        f(row["AUROC(Φ)"]),
        f"{row['colour right']:.2f} / {row['shape right']:.2f}",
        f"{row['last loss']:.3f}",
        f"{row['s']:.0f}" if "s" in row else "",
    ]


def main(argv: list[str] | None = None) -> None:
    import torch

    from vlcal_verl.demo.pipeline import demo_config_of
    from vlcal_verl.main_args import compose_recipe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny_science.yaml"))
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--rlcr-fraction", type=float)
    p.add_argument("--train-size", type=int, help="training items = fit (dev: the next new-image items)")
    p.add_argument("--vision-depth", type=int, default=0, help="0: the tiny builder's (2)")
    p.add_argument("--vision-width", type=int, default=0, help="0: the tiny builder's (32)")
    p.add_argument("--init-seed", type=int, help="the model's init and batch order (default: demo.seed)")
    p.add_argument(
        "--model", help="a saved warm start (e.g. runs/science/warm_start): sample dev only, no training"
    )
    p.add_argument("--setting", action="append", default=[], help="KEY=V,... one row each (see above)")
    p.add_argument("--rlcr-layout", action="store_true", help="also sample dev in RLCR's layout (a row)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the README's rows: 1)")
    args = p.parse_args(argv)
    config = compose_recipe(args.recipe, [])
    dc = demo_config_of(config)
    recipe = {"steps": dc.warm_start_steps, "lr": dc.warm_start_lr, "batch": dc.warm_start_batch_size,
              "image_size": dc.image_size, "rlcr_fraction": dc.warm_start_rlcr_fraction,
              "train_size": dc.train_size, "vision_depth": 0, "vision_width": 0, "init_seed": dc.seed}  # fmt: skip
    flags = {k: v for k in KEYS if (v := getattr(args, k)) is not None}
    defaults = {**recipe, **flags}
    if args.model and args.setting:
        p.error("--model samples one saved warm start; --setting trains new ones (give one or the other)")
    settings = [parse_setting(s, defaults) for s in args.setting] or [defaults]
    torch.set_num_threads(args.threads)
    header = "| warm start (dev) | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|---|" + "---:|" * len(COLUMNS)]
    for setting in settings:
        name = f"saved {args.model}" if args.model else label(setting, recipe)
        print(f"== {name}", flush=True)
        layouts = ["decoupled", "rlcr"] if args.rlcr_layout else ["decoupled"]
        rows = run_setting(dc, setting, int(config.data.max_response_length), layouts, args.model)
        for layout, row in zip(layouts, rows, strict=True):
            row_name = name + (", prompted in RLCR's layout" if layout == "rlcr" else "")
            lines.append(f"| {row_name} | " + " | ".join(cells(row)) + " |")
        print("\n".join([*lines[:2], *lines[-len(rows) :]]), f"\ndev counts: {rows[0]['counts']}", flush=True)
    print("\n" + "\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
