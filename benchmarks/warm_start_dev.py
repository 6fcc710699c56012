"""Warm-start settings compared on the training split only: fit on its first items, sample the last ones.

The science recipe's 1,024 training items (``load_demo_data`` as ``prepare_assets`` builds them, with no
held-out items: ``eval_size`` 0, so easy-vqa's test split is never read) are split into fit (the first
824) and dev (the last 200). Each setting is warm-started on fit with the project's ``warm_start`` (the
arguments ``warm_started_model`` passes) and dev is sampled with ``generate_hf`` at the recipe's
evaluation temperature, scored by ``score_generations`` and judged by the exact easy-vqa judge. One
Markdown row per setting, in the columns of README "Choosing the warm start on the training split",
plus the share of dev descriptions naming the right colour / shape and the last loss.

    python benchmarks/warm_start_dev.py --steps 2000 --lr 3e-3                # one setting
    python benchmarks/warm_start_dev.py --setting steps=1000,image_size=64 \\
        --setting steps=1000,vision_depth=4                                  # rows side by side

``--setting`` keys: steps, lr, batch, image_size, rlcr_fraction, train_size, vision_depth, vision_width (the tiny
Qwen-VL vision tower; 0 keeps the builder's); unset keys take the flags' values, whose defaults are the
recipe's ``demo:`` block.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIT, DEV = 824, 200
KEYS = {"steps": int, "lr": float, "batch": int, "image_size": int, "rlcr_fraction": float, "train_size": int}
KEYS |= {"vision_depth": int, "vision_width": int}
COLUMNS = (
    "what colour", "what shape", "yes/no colour", "yes/no shape", "z_vis correct", "AUROC(Φ)",
    "desc. colour / shape right", "last loss", "s",
)  # fmt: skip
QTYPES = ("question: colour", "question: shape", "question: yes/no (colour)", "question: yes/no (shape)")


def fit_dev_split(items: list[Any], fit: int = FIT, dev: int = DEV) -> tuple[list[Any], list[Any]]:
    """(fit, dev): dev = items[fit : fit + dev] (the last 200 of the recipe's 1,024); fit = the first ``fit``
    items, plus those after dev whose image no dev item shows (a larger ``train_size`` adds fit items and
    leaves dev as it is). ValueError if any item is not a training-split item (a held-out item must never
    reach this benchmark) or there are too few."""
    if fit + dev > len(items):
        raise ValueError(f"fit {fit} + dev {dev} > {len(items)} items")
    wrong = [it.uid for it in items if not str(it.uid).startswith("easy-vqa/train/")]
    if wrong:
        raise ValueError(f"not training-split items: {wrong[:3]}")
    dev_items = list(items[fit : fit + dev])
    seen = {it.image.tobytes() for it in dev_items}
    extra = [it for it in items[fit + dev :] if it.image.tobytes() not in seen]
    return [*items[:fit], *extra], dev_items


def fit_dev_items(train_size: int, seed: int, image_size: int) -> tuple[list[Any], list[Any]]:
    """The recipe's training items as ``prepare_assets`` loads them, without held-out items, split."""
    from vlcal_verl.demo.data import load_demo_data

    return fit_dev_split(load_demo_data(train_size, 0, seed, image_size).train)  # 0: no test-split items


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

    torch.manual_seed(dc.seed)  # as warm_started_model does
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


def run_setting(dc: Any, setting: dict[str, Any], max_new_tokens: int, layouts: list[str]) -> list[dict]:
    """Warm start on fit, then one row per layout (protocol) dev is sampled in; the first has the seconds."""
    from vlcal_verl.demo.warm_start import warm_start

    t0 = time.perf_counter()
    fit, dev = fit_dev_items(setting["train_size"], dc.seed, setting["image_size"])
    model, processor = tiny_model(dc, setting)
    shared = len({it.image.tobytes() for it in fit} & {it.image.tobytes() for it in dev})
    print(f"fit {len(fit)} items, dev {len(dev)}; dev images also in fit: {shared}", flush=True)
    losses = warm_start(
        model,
        processor,
        fit,
        steps=setting["steps"],
        batch_size=setting["batch"],
        lr=setting["lr"],
        weight_decay=0.0,
        grad_clip=1.0,
        seed=dc.seed,
        rlcr_fraction=setting["rlcr_fraction"],
    )
    rows = [dev_row(model, processor, dev, dc, max_new_tokens, protocol) for protocol in layouts]
    for row in rows:
        row["last loss"] = sum(losses[-50:]) / max(len(losses[-50:]), 1)
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
    p.add_argument("--train-size", type=int, help="training items loaded (dev: items 824-1023 always)")
    p.add_argument("--vision-depth", type=int, default=0, help="0: the tiny builder's (2)")
    p.add_argument("--vision-width", type=int, default=0, help="0: the tiny builder's (32)")
    p.add_argument("--setting", action="append", default=[], help="KEY=V,... one row each (see above)")
    p.add_argument("--rlcr-layout", action="store_true", help="also sample dev in RLCR's layout (a row)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the README's rows: 1)")
    args = p.parse_args(argv)
    config = compose_recipe(args.recipe, [])
    dc = demo_config_of(config)
    recipe = {"steps": dc.warm_start_steps, "lr": dc.warm_start_lr, "batch": dc.warm_start_batch_size,
              "image_size": dc.image_size, "rlcr_fraction": dc.warm_start_rlcr_fraction,
              "train_size": dc.train_size, "vision_depth": 0, "vision_width": 0}  # fmt: skip
    flags = {k: v for k in KEYS if (v := getattr(args, k)) is not None}
    defaults = {**recipe, **flags}
    settings = [parse_setting(s, defaults) for s in args.setting] or [defaults]
    torch.set_num_threads(args.threads)
    header = "| warm start (dev) | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|---|" + "---:|" * len(COLUMNS)]
    for setting in settings:
        print(f"== {label(setting, recipe)}", flush=True)
        layouts = ["decoupled", "rlcr"] if args.rlcr_layout else ["decoupled"]
        rows = run_setting(dc, setting, int(config.data.max_response_length), layouts)
        for layout, row in zip(layouts, rows, strict=True):
            name = label(setting, recipe) + (", prompted in RLCR's layout" if layout == "rlcr" else "")
            lines.append(f"| {name} | " + " | ".join(cells(row)) + " |")
        print("\n".join([*lines[:2], *lines[-len(rows) :]]), f"\ndev counts: {rows[0]['counts']}", flush=True)
    print("\n" + "\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
