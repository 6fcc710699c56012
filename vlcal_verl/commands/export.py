"""``vlcal export``: a verl FSDP checkpoint → a Hugging Face model folder ``vlcal eval --model`` reads.

    vlcal export checkpoints/vlcal/qwen3_vl_4b OUT_DIR                     # the latest global_step_N
    vlcal export checkpoints/vlcal/qwen3_vl_4b/global_step_300/actor OUT_DIR

The conversion is verl's own ``verl.model_merger`` (``FSDPModelMerger``, what ``python -m
verl.model_merger merge --backend fsdp`` runs): it gathers the ``model_world_size_W_rank_R.pt`` shards,
writes the weights (bfloat16, verl's choice) with the config from ``actor/huggingface`` and saves the
processor and tokenizer found there. The output is written to a temporary sibling folder and renamed
at the end, so a failed export leaves no half-written OUT_DIR.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from vlcal_verl.commands.eval import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        type=Path,
        help="verl checkpoint: the run's checkpoint folder (latest step), global_step_N, or global_step_N/actor",
    )
    p.add_argument("out", type=Path, help="HF model folder to create (must not exist, or be empty)")
    p.add_argument("--trust-remote-code", action="store_true", help="passed to verl's merger")


def actor_dir(checkpoint: Path) -> Path:
    """The ``global_step_N/actor`` folder of a checkpoint path (the latest step for a run folder)."""
    if checkpoint.is_file():
        raise UsageError(
            f"{checkpoint}: is a file; give the checkpoint folder (the run's, global_step_N or global_step_N/actor)"
        )
    if not checkpoint.is_dir():
        raise UsageError(f"{checkpoint}: no such folder")
    if (checkpoint / "fsdp_config.json").is_file():
        return checkpoint
    if (checkpoint / "actor").is_dir():
        return actor_dir(checkpoint / "actor")
    latest = checkpoint / "latest_checkpointed_iteration.txt"
    if latest.is_file():
        return actor_dir(checkpoint / f"global_step_{latest.read_text().strip()}")
    steps = sorted(
        (p for p in checkpoint.glob("global_step_*") if p.name.removeprefix("global_step_").isdigit()),
        key=lambda p: int(p.name.removeprefix("global_step_")),
    )
    if steps:
        return actor_dir(steps[-1])
    if (checkpoint / "model").is_dir() or (checkpoint / "dist_ckpt").is_dir():
        raise UsageError(
            f"{checkpoint}: a Megatron checkpoint; run `python -m verl.model_merger merge --backend megatron`"
        )
    raise UsageError(
        f"{checkpoint}: not a verl FSDP checkpoint (no fsdp_config.json, actor/, global_step_N/ or "
        "latest_checkpointed_iteration.txt)"
    )


def _check(actor: Path, out: Path) -> None:
    if not (actor / "huggingface" / "config.json").is_file():
        raise UsageError(f"{actor}: no huggingface/config.json (verl saves it with every checkpoint)")
    if not any(actor.glob("model_world_size_*_rank_0.pt")):
        raise UsageError(f"{actor}: no model_world_size_W_rank_0.pt shards (save_contents needs 'model')")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: exists and is not an empty folder; choose a new OUT_DIR")
    if not out.parent.exists():
        raise UsageError(f"{out}: parent folder {out.parent} does not exist")


PROCESSOR_FILES = {
    "processor config": ("processor_config.json", "preprocessor_config.json"),
    "tokenizer config": ("tokenizer_config.json",),
}
"""What ``AutoProcessor`` needs, by alternative names: transformers ≥ 4.5x saves the image processor
inside ``processor_config.json``, older versions (and some models) as ``preprocessor_config.json``."""


def missing_processor_files(folder: Path) -> list[str]:
    """The processor files ``vlcal eval`` would miss in ``folder``, by name (empty when it has them)."""
    return [
        " or ".join(names)
        for names in PROCESSOR_FILES.values()
        if not any((folder / n).is_file() for n in names)
    ]


def export(actor: Path, out: Path, trust_remote_code: bool = False) -> Path:
    """Merge ``actor`` into ``out`` with verl's FSDP model merger; returns ``out``."""
    from verl.model_merger.base_model_merger import ModelMergerConfig
    from verl.model_merger.fsdp_model_merger import FSDPModelMerger

    tmp = out.with_name(f".{out.name}.exporting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        config = ModelMergerConfig(
            operation="merge",
            backend="fsdp",
            local_dir=str(actor),
            target_dir=str(tmp),
            hf_model_config_path=str(actor / "huggingface"),
            trust_remote_code=trust_remote_code,
        )
        merger = FSDPModelMerger(config)
        merger.merge_and_save()
        merger.cleanup()
        if out.exists():
            out.rmdir()  # empty (checked)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def run(args: argparse.Namespace) -> int:
    try:
        actor = actor_dir(args.checkpoint)
        _check(actor, args.out)
    except UsageError as err:
        print(f"vlcal export: {err}", file=sys.stderr)
        return 2
    export(actor, args.out, trust_remote_code=args.trust_remote_code)
    missing = missing_processor_files(args.out)
    note = f" (no {', '.join(missing)}: copy the processor files from the base model)" if missing else ""
    print(f"vlcal export: {actor} → {args.out}{note}; next: vlcal eval --model {args.out} ...")
    return 0
