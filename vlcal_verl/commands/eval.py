"""``vlcal eval``: generate on benchmarks (or take existing generations), score, write the report.

    vlcal eval --model tiny:qwen3-vl --bench easy-vqa,easy-vqa-unanswerable --limit 200 --out DIR
    vlcal eval --model /ckpt/hf --backend vllm --dp 8 --bench all --data-dir data/bench --out DIR
    vlcal eval --model /ckpt/hf --vce --recipe recipes/qwen3_vl_4b.yaml --bench all --out DIR
    vlcal eval --generations gens.jsonl --out DIR [--judgments judgments.json]
    vlcal eval --compare REPORT_A REPORT_B          # B − A with paired-bootstrap intervals
    vlcal eval --aggregate RUN1 RUN2 RUN3           # mean ± std over seeds

Offline benchmarks: ``easy-vqa`` and ``easy-vqa-unanswerable`` (test split of the easy-vqa package).

Every user mistake (a missing path, a bad option combination) is one line on stderr and exit 2,
before anything is generated or written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from vlcal_verl.testing.tiny_models import FAMILIES

BENCHES = {
    "easy-vqa": {"unanswerable": False},
    "easy-vqa-unanswerable": {"unanswerable": True},
}
TINY_FAMILIES = FAMILIES

DEFAULT_MAX_NEW_TOKENS = 4096  # the recipes' data.max_response_length: evaluate at the length trained at
TINY_MAX_NEW_TOKENS = 48


class UsageError(Exception):
    """A mistake in the command line: reported as one line, exit 2, before any work."""


def default_max_new_tokens(model: str) -> int:
    """A tiny random model never emits end-of-turn, so a short budget keeps the offline smoke run fast."""
    return TINY_MAX_NEW_TOKENS if model.startswith("tiny:") else DEFAULT_MAX_NEW_TOKENS


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--model",
        help="HF model folder (e.g. `vlcal export` output), hub id, or tiny:qwen3-vl / tiny:internvl",
    )
    src.add_argument(
        "--generations", type=Path, help="JSONL with response, ground_truth[, benchmark, uid, truncated, ...]"
    )
    src.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("A", "B"),
        help="two report folders: per-metric B − A with bootstrap intervals (paired when uids match)",
    )
    src.add_argument(
        "--aggregate", nargs="+", type=Path, metavar="RUN", help="report folders of one model: mean ± std"
    )
    p.add_argument(
        "--bench",
        default="easy-vqa",
        help=f"comma-separated, or 'all'; offline: {', '.join(BENCHES)}; others read DATA_DIR/NAME.parquet",
    )
    p.add_argument(
        "--data-dir", type=Path, default=None, help="folder of `vlcal data bench` outputs (NAME.parquet)"
    )
    p.add_argument("--limit", type=int, default=None, help="items per benchmark")
    p.add_argument("--out", type=Path, help="report folder (required except with --compare/--aggregate)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the report already in --out (without it a non-empty --out is refused)",
    )
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    p.add_argument(
        "--recipe",
        type=Path,
        help="training recipe: --max-new-tokens defaults to its data.max_response_length, --vce to its vlcal.vce",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"default: the --recipe's data.max_response_length, else {DEFAULT_MAX_NEW_TOKENS} "
        f"(the recipes' response length); {TINY_MAX_NEW_TOKENS} for tiny:* models",
    )
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    p.add_argument("--batch-size", type=int, default=16, help="HF backend: prompts per generate call")
    p.add_argument("--protocol", choices=("decoupled", "rlcr"), default="decoupled")
    p.add_argument(
        "--prompt-template",
        type=Path,
        default=None,
        help="Jinja file rendering {{ content }} (the question), as given to `vlcal data` for training "
        "(also read from $VLCAL_PROMPT_TEMPLATE)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling, VCE masks and bootstrap draws")
    p.add_argument(
        "--judgments", type=Path, help="JSON {uid: 0|1} external visual judgments (S̃_vis agreement)"
    )
    p.add_argument(
        "--vce",
        action="store_true",
        help="HF backend: each item's K̄, H̄, S̃_vis with training's VCE code (masked-image forward)",
    )
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    g = p.add_argument_group("vLLM (--backend vllm)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs per engine")
    g.add_argument("--dp", type=int, default=1, help="engines, one per GPU group; items sharded between them")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--max-model-len", type=int, default=None, help="prompt + response tokens (vLLM default)")
    g.add_argument("--max-num-seqs", type=int, default=None, help="sequences per engine step (vLLM default)")


# ----------------------------------------------------------------------------- validation


def _looks_like_path(name: str) -> bool:
    """A hub id is ``owner/name``; a leading ``/ . ~`` or more than one ``/`` means a local path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _check_model(name: str) -> None:
    if name.startswith("tiny:"):
        if name.removeprefix("tiny:") not in TINY_FAMILIES:
            raise UsageError(
                f"--model {name}: unknown tiny model; use one of tiny:{', tiny:'.join(TINY_FAMILIES)}"
            )
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            ckpt = path.is_dir() and (
                (path / "fsdp_config.json").exists()
                or (path / "actor").is_dir()
                or any(path.glob("global_step_*"))
            )
            hint = "; a verl checkpoint: convert it with `vlcal export CKPT_DIR OUT_DIR`" if ckpt else ""
            raise UsageError(f"--model {name}: not a Hugging Face model folder (no config.json){hint}")
    elif _looks_like_path(name):
        raise UsageError(
            f"--model {name}: no such path (give a model folder, e.g. the output of `vlcal export`, "
            "a hub id owner/name, tiny:qwen3-vl or tiny:internvl)"
        )


def _is_internvl(name: str) -> bool:
    """``tiny:internvl`` or a local folder whose config.json says ``model_type: internvl``."""
    if name.startswith("tiny:"):
        return name == "tiny:internvl"
    config = Path(name).expanduser() / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "internvl"


def _check_out(
    out: Path | None, inputs: list[Path], required: bool = True, overwrite: bool | None = None
) -> None:
    """``overwrite`` None: no emptiness check (--compare/--aggregate); False: a non-empty folder is refused."""
    if out is None:
        if required:
            raise UsageError("--out is required: the report folder to write")
        return
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    anchor = out.absolute()
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir() or not os.access(anchor, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot create or write in {anchor}")
    for p in inputs:
        if (out / "generations.jsonl").absolute().resolve() == p.absolute().resolve():
            raise UsageError(f"--out {out}: would overwrite the input {p}; choose another --out")
    if overwrite is False and out.is_dir() and any(out.iterdir()):
        held = [n for n in REPORT_FILES if (out / n).exists()]
        what = f"already holds a report ({', '.join(held)})" if held else "is not empty"
        raise UsageError(f"--out {out}: {what}; choose a new folder, or pass --overwrite to replace it")


REPORT_FILES = ("metrics.json", "generations.jsonl", "report.md", "report.html")
REPORT_PLOTS = ("reliability*.png", "risk_coverage.png")


def clear_report(out: Path) -> None:
    """Remove a previous report's files from ``out`` (``--overwrite``), so no earlier per-benchmark figure
    is left beside the new ones; other files (e.g. ``vlcal judge``'s judgments) stay."""
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)
    for pattern in REPORT_PLOTS:
        for path in out.glob(pattern):
            path.unlink()


def _check_file(flag: str, path: Path) -> None:
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")


def _read_judgments(path: Path) -> dict[str, float]:
    _check_file("--judgments", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"--judgments {path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not all(isinstance(v, int | float) for v in data.values()):
        raise UsageError(f"--judgments {path}: must be a JSON object {{uid: 0 or 1}} (see `vlcal judge`)")
    return {str(k): float(v) for k, v in data.items()}


def _bench_names(args: argparse.Namespace) -> list[str]:
    names = [b.strip() for b in args.bench.split(",") if b.strip()]
    data_dir = args.data_dir or Path(".")
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise UsageError(f"--data-dir {args.data_dir}: no such folder")
    if names == ["all"]:  # every prepared benchmark in --data-dir
        names = sorted(p.stem for p in data_dir.glob("*.parquet"))
        if not names:
            raise UsageError(
                f"--bench all: no NAME.parquet in {data_dir} (run `vlcal data bench NAME --out DIR`)"
            )
    if not names:
        raise UsageError("--bench: no benchmark named")
    missing = [b for b in names if b not in BENCHES and not (data_dir / f"{b}.parquet").exists()]
    _check_known(missing, data_dir)
    if missing:
        raise UsageError(
            f"--bench: {missing} not offline ({sorted(BENCHES)}) and no {data_dir}/NAME.parquet; "
            "prepare with `vlcal data bench NAME --out DIR` and pass --data-dir DIR"
        )
    return names


def _check_known(missing: list[str], data_dir: Path) -> None:
    """A name neither prepared in ``data_dir`` nor a benchmark ``vlcal data bench`` knows: say so, list them."""
    import difflib

    from vlcal_verl.data.benchmarks import NAMES

    for name in missing:
        base = name.removesuffix("-unanswerable")
        if base not in NAMES:
            close = difflib.get_close_matches(base, NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(
                f"--bench: unknown benchmark {name!r}{hint}; available: {', '.join(NAMES)} "
                f"(or any NAME.parquet prepared in {data_dir})"
            )


def _recipe(path: Path) -> Any:
    _check_file("--recipe", path)
    from vlcal_verl.main import compose_recipe

    try:
        return compose_recipe(path)
    except Exception as err:  # Hydra/OmegaConf errors: the file is the user's
        raise UsageError(
            f"--recipe {path}: cannot compose it ({type(err).__name__}: {err})".split("\n")[0]
        ) from None


def _vce_config(recipe: Any, seed: int) -> Any:
    from vlcal_verl.config import VCEConfig

    if recipe is None:
        return VCEConfig(seed=seed)
    from vlcal_verl.main import vlcal_config

    return vlcal_config(recipe).vce


def _check_vllm(args: argparse.Namespace) -> None:
    import importlib.util

    from vlcal_verl.evaluation.generate import gpu_groups

    for flag, v in (("--tp", args.tp), ("--dp", args.dp)):
        if v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise UsageError(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    if args.vce:
        raise UsageError("--vce needs --backend hf (it reruns the model on the generated tokens)")
    if importlib.util.find_spec("vllm") is None:
        raise UsageError(
            "--backend vllm needs vLLM (GPU): pip install -e '.[gpu]'; use --backend hf on a CPU"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        import torch

        visible = ",".join(str(i) for i in range(torch.cuda.device_count()))
    try:
        gpu_groups(args.dp, args.tp, visible)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _validate(args: argparse.Namespace) -> dict[str, Any]:
    """Every check that needs no model: paths, option combinations. Returns what generation needs."""
    plan: dict[str, Any] = {"judgments": None, "recipe": None}
    if args.judgments is not None:
        plan["judgments"] = _read_judgments(args.judgments)
    if args.generations is not None:
        _check_file("--generations", args.generations)
        if args.vce:
            raise UsageError("--vce needs --model (it reruns the model on the generated tokens)")
        _check_out(args.out, [args.generations], overwrite=args.overwrite)
        return plan
    _check_model(args.model)
    if args.vce and _is_internvl(args.model):
        raise UsageError(
            "--vce: the evaluation's VCE pass reads Qwen-VL's patch rows; InternVL's VCE runs in training "
            "(verl's actor) — drop --vce for this model"
        )
    _check_out(args.out, [], overwrite=args.overwrite)
    for flag, v in (("--max-new-tokens", args.max_new_tokens), ("--limit", args.limit)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    _check_sampling(args)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.backend == "vllm":
        _check_vllm(args)
    plan["names"] = _bench_names(args)
    if args.recipe is not None:
        plan["recipe"] = _recipe(args.recipe)
    if args.max_new_tokens is not None:
        plan["max_new_tokens"] = args.max_new_tokens
    elif plan["recipe"] is not None:
        plan["max_new_tokens"] = int(plan["recipe"].data.max_response_length)
    else:
        plan["max_new_tokens"] = default_max_new_tokens(args.model)
    return plan


def _check_sampling(args: argparse.Namespace) -> None:
    """The sampler's ranges, checked before the model loads (the samplers raise only mid-generation)."""
    if not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1] (1 = no nucleus cut), got {args.top_p}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0.0):
        raise UsageError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")


# ----------------------------------------------------------------------------- generation


def read_jsonl_rows(
    path: Path,
    required: tuple[str, ...],
    hint: str = "",
    allow_empty: bool = False,
    numbers_ok: tuple[str, ...] = (),
) -> list[dict]:
    """JSON objects, one per line, each with string fields ``required``; a bad line is a UsageError naming
    the line (``hint`` says what file was expected). Fields in ``numbers_ok`` may also be numbers, read
    as their text (a numeric ground truth, as ``vlcal score`` and the reward server take it). UTF-8, a
    byte-order mark skipped."""
    from vlcal_verl.commands.inputs import ENCODING, not_utf8

    rows = []
    with open(path, encoding=ENCODING) as f:
        try:
            for n, line in enumerate(f, 1):
                if line.strip():
                    rows.append(_row(line, path, n, required, hint, numbers_ok))
        except UnicodeDecodeError:
            raise UsageError(not_utf8(path)) from None
    if not rows and not allow_empty:
        raise UsageError(f"--generations {path}: no rows")
    return rows


def _row(
    line: str, path: Path, n: int, required: tuple[str, ...], hint: str, numbers_ok: tuple[str, ...]
) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}:{n}: not valid JSON ({err.msg})") from None
    for key in required:
        value = row.get(key) if isinstance(row, dict) else None
        if key in numbers_ok and isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise UsageError(f"{path}:{n}: field {key!r} must be a string or a finite number")
            row[key] = str(value)
        elif not isinstance(value, str):
            kind = "a string or number" if key in numbers_ok else "a string"
            raise UsageError(f"{path}:{n}: field {key!r} missing or not {kind}{hint}")
    return row


def _read_generations(path: Path) -> list[dict]:
    return read_jsonl_rows(path, ("response", "ground_truth"), numbers_ok=("ground_truth",))


def load_items(
    names: list[str], data_dir: Path | None, limit: int | None, seed: int
) -> list[tuple[str, Any]]:
    """(benchmark name, item) for every item of every benchmark, in order."""
    from vlcal_verl.data.easy_vqa import load_easy_vqa
    from vlcal_verl.evaluation.generate import load_bench_items

    out = []
    for name in names:
        if name in BENCHES:
            items = load_easy_vqa("test", limit=limit, seed=seed, **BENCHES[name])
        else:
            items = load_bench_items((data_dir or Path(".")) / f"{name}.parquet", limit=limit)
        out.extend((name, it) for it in items)
    return out


def _generate(args: argparse.Namespace, plan: dict[str, Any], named: list[tuple[str, Any]]) -> list[dict]:
    from vlcal_verl.evaluation.generate import (
        GenerationSettings,
        VLLMOptions,
        generate_hf,
        generate_vllm,
        load_hf_model,
    )

    settings = GenerationSettings(
        max_new_tokens=plan["max_new_tokens"],
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        batch_size=args.batch_size,
        seed=args.seed,
        protocol=args.protocol,
    )
    items = [it for _, it in named]
    vce = None
    if args.backend == "hf":
        model, processor = load_hf_model(args.model)
        gens = generate_hf(model, processor, items, settings)
        if args.vce:
            from vlcal_verl.evaluation.vce_eval import normalize_per_group, vce_scores

            vce = vce_scores(
                model,
                processor,
                items,
                [g.token_ids for g in gens],
                protocol=args.protocol,
                cfg=_vce_config(plan["recipe"], args.seed),
                batch_size=args.batch_size,
            )
            s_vis = normalize_per_group([v["s"] for v in vce], [name for name, _ in named])
            for v, s in zip(vce, s_vis, strict=True):
                v["s_vis"] = s
    else:
        options = VLLMOptions(
            tp=args.tp,
            dp=args.dp,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
        )
        gens = generate_vllm(args.model, items, settings, options)
    rows: list[dict] = []
    for i, ((name, it), g) in enumerate(zip(named, gens, strict=True)):
        rows.append(
            {
                "benchmark": name,
                "uid": it.uid,
                "question": it.question,
                "ground_truth": it.answer,
                "answer_kind": it.kind,
                "unanswerable": getattr(it, "unanswerable", it.data_source.endswith("-unanswerable")),
                "response": g.text,
                "truncated": g.truncated,
                "n_tokens": g.n_tokens,
                **(vce[i] if vce is not None else {}),
            }
        )
    return rows


def _write_generations(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def run(args: argparse.Namespace) -> int:
    if args.compare or args.aggregate:
        from vlcal_verl.commands.eval_summary import run_summary

        return run_summary(args)
    try:
        from vlcal_verl.commands.data import use_prompt_template

        try:
            use_prompt_template(args.prompt_template)
        except ValueError as err:
            raise UsageError(str(err)) from None
        plan = _validate(args)
        if args.generations:
            rows = _read_generations(args.generations)
        else:
            try:
                named = load_items(plan["names"], args.data_dir, args.limit, args.seed)
            except (OSError, ValueError) as err:  # a prepared file that does not read: the user's data
                raise UsageError(f"--bench: {err}") from None
    except UsageError as err:
        print(f"vlcal eval: {err}", file=sys.stderr)
        return 2
    if not args.generations:
        rows = _generate(args, plan, named)

    from vlcal_verl.commands.inputs import uid_key, warn_duplicate_uids
    from vlcal_verl.evaluation.generate import score_generations
    from vlcal_verl.evaluation.report import write_report
    from vlcal_verl.evaluation.visual_judge import add_visual_judgments

    source = str(args.generations) if args.generations else "the generated items"
    warn_duplicate_uids("vlcal eval", source, (uid_key(r) for r in rows))
    # easy-vqa items: visual_correct from the exact judge (after scoring: score_generations rebuilds the rows)
    records = add_visual_judgments(score_generations(rows, protocol=args.protocol), args.protocol)
    if args.overwrite and args.out.is_dir():
        clear_report(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    _write_generations(args.out / "generations.jsonl", records)
    title = f"vlcal eval — {args.model or args.generations.name}"
    metrics = write_report(
        records, args.out, title=title, judgments=plan["judgments"], n_boot=args.n_boot, seed=args.seed
    )
    print((args.out / "report.md").read_text(encoding="utf-8").split("\n![")[0])
    o = metrics["overall"] or {}
    print(
        f"wrote {args.out}/metrics.json, report.md, report.html, generations.jsonl "
        f"({o.get('n', 0)} answerable items)"
    )
    return 0
