"""The command line of ``python -m vlcal_verl.main``: our flags → Hydra's argv, and Hydra's and YAML's
complaints about a recipe as one line.

A recipe is composed as a Hydra *config name* in its own folder, and Hydra appends ``.yaml`` to a name
that lacks it — so a recipe named anything but ``*.yaml`` would silently compose a different file
(``exp.yml`` or ``exp.yaml.bak`` → ``exp.yaml`` beside it). Only ``.yaml`` names are accepted, and the
name passed to Hydra is the file's own name, so the file composed is exactly the file named.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from omegaconf import DictConfig

EXIT_CONFIG_ERROR = 2
CONFIG_DIR = Path(__file__).resolve().parent / "hydra_conf"

USAGE_EPILOG = """\
every other argument goes to Hydra: key=value overrides (variant=exact, ablation=rlcr,
vlcal.vce.mask_cell_px=14, +device=cpu, ...) and Hydra's own flags (--hydra-help, --cfg job).

examples:
  python -m vlcal_verl.main --check --recipe recipes/qwen3_vl_4b.yaml ablation=rlcr
  python -m vlcal_verl.main --check --print-config --recipe recipes/qwen3_vl_4b.yaml > run.yaml
  python -m vlcal_verl.main --recipe recipes/qwen3_vl_4b.yaml variant=exact

A configuration mistake is one line on stderr and exit code 2, before Ray starts."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``[vlcal]`` line and exit code 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        usage_error(f"{message} (see --help)")


def parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="python -m vlcal_verl.main",
        description="VL-Calibration GRPO on verl 0.9.1: compose a recipe with Hydra, check it as verl "
        "does, and run verl's trainer (Ray).",
        epilog=USAGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--recipe",
        metavar="FILE.yaml",
        help="the recipe to compose (e.g. recipes/qwen3_vl_4b.yaml); exactly this file, which must end "
        "in .yaml. Without it: vlcal_trainer.yaml (set actor_rollout_ref.model.path)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="compose and validate the config as verl does (plus the vlcal checks), print a summary and "
        "exit 0: no Ray, no GPU, no files written",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="with --check (implied): stdout is exactly the composed config as YAML, after the vlcal "
        "wiring (everything else goes to stderr), e.g. > run.yaml",
    )
    return p


def usage_error(message: str) -> NoReturn:
    print(f"[vlcal] {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CONFIG_ERROR)


def recipe_path(value: str | Path) -> Path:
    """The recipe file, resolved; ValueError (one line) when it is missing or not a ``.yaml`` file."""
    recipe = Path(value).resolve()
    if not recipe.is_file():
        raise ValueError(f"--recipe: no such file: {recipe}")
    if recipe.suffix != ".yaml":
        raise ValueError(
            f"--recipe {value}: not a .yaml file — Hydra reads <name>.yaml, so any other name would "
            "compose a different file; copy or rename it to end in .yaml"
        )
    return recipe


def verl_config_dir() -> Path:
    """verl's ``trainer/config`` folder, found without importing verl.

    A ``pkg://verl.trainer.config`` search path would ``import verl`` while Hydra composes, before the
    config says which device it is for — and ``import verl`` loads the plugins, which set up the CPU
    backend only when ``VERL_PLATFORM=cpu`` is already exported, and imports Ray, which must know by then
    that it binds to the loopback address.
    """
    import importlib.util

    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("verl is not installed: pip install 'verl[verl-core]==0.9.1'")
    return Path(next(iter(spec.submodule_search_locations))) / "trainer" / "config"


def search_path() -> str:
    return f"hydra.searchpath=[file://{CONFIG_DIR},file://{verl_config_dir()}]"


def hydra_argv(argv: list[str]) -> list[str]:
    """Translate our flags into Hydra's: ``--recipe FILE`` / ``--recipe=FILE`` → ``--config-path/
    --config-name``; ``--check`` → ``VLCAL_CHECK_ONLY=1``; ``--print-config`` → ``VLCAL_PRINT_CONFIG=1``
    (and ``--check``); and put this package's configs plus verl's on the search path (a package directory
    named ``config`` next to ``config.py`` cannot be a ``pkg://`` search path entry)."""
    args, rest = parser().parse_known_args(list(argv))
    if args.print_config:
        os.environ["VLCAL_PRINT_CONFIG"] = "1"
    if args.check or args.print_config:
        os.environ["VLCAL_CHECK_ONLY"] = "1"
        # a check writes nothing: no outputs/DATE/ run folder, no .hydra copy, no log file
        rest += ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=none", "hydra/hydra_logging=none"]  # fmt: skip
    if args.recipe is not None:
        try:
            recipe = recipe_path(args.recipe)
        except ValueError as err:
            usage_error(str(err))
        rest[:0] = ["--config-path", str(recipe.parent), "--config-name", recipe.name]
    if not any(a.startswith("hydra.searchpath") for a in rest):
        rest.append(search_path())
    return rest


def compose_recipe(recipe: str | Path, overrides: list[str] | None = None) -> DictConfig:
    """The config ``python -m vlcal_verl.main --recipe RECIPE OVERRIDES`` runs with (Hydra's compose API;
    nothing is checked or started)."""
    from hydra import compose, initialize_config_dir

    recipe = recipe_path(recipe)
    with initialize_config_dir(config_dir=str(recipe.parent), version_base=None):
        return compose(config_name=recipe.name, overrides=[*(overrides or []), search_path()])


def _yaml_problem(err: BaseException) -> str | None:
    """A YAML syntax error or duplicate key, as ``FILE line N: problem`` (None for other errors)."""
    import yaml

    while err is not None:
        if isinstance(err, yaml.MarkedYAMLError):
            mark = err.problem_mark or err.context_mark
            where = f"{mark.name} line {mark.line + 1}" if mark is not None else "a config file"
            problem = " ".join(str(err.problem or err.context or "invalid YAML").split())
            return f"invalid YAML in {where}: {problem}"
        if isinstance(err, yaml.YAMLError):
            return f"invalid YAML: {' '.join(str(err).split())}"
        err = err.__cause__ or err.__context__
    return None


def one_line(err: BaseException) -> str:
    """Hydra's multi-line message (and its cause's) as one line, without the search-path dump."""
    yaml_problem = _yaml_problem(err)
    if yaml_problem is not None:
        return yaml_problem
    parts: list[str] = []
    while err is not None:
        for line in str(err).splitlines():
            line = line.strip()
            if line.startswith("Config search path"):
                break
            if line and not line.startswith(("full_key:", "object_type=", "provider=", "path=")):
                parts.append(line)
        err = err.__cause__
    return " ".join(dict.fromkeys(parts)) or "invalid configuration"


_HYDRA_VALUE_FLAGS = frozenset(
    {"--cfg", "-c", "--package", "-p", "--config-dir", "-cd", "--experimental-rerun"}
)
_INFO = frozenset({"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"})  # --info's choices


def composition_error(argv: list[str]) -> str | None:
    """Compose the config as ``_hydra_main`` will (Hydra's compose API) and return Hydra's (or the YAML
    parser's) complaint as one line, or None. Hydra itself would print it over several lines and exit 1;
    a YAML error would be a 26-frame traceback."""
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    config_dir, config_name, overrides, i = str(CONFIG_DIR), "vlcal_trainer", [], 0
    while i < len(argv):
        arg, value = argv[i], argv[i + 1] if i + 1 < len(argv) else None
        if arg in ("--config-path", "-cp", "--config-name", "-cn") and value is not None:
            config_dir, config_name = (
                (value, config_name) if arg in ("--config-path", "-cp") else (config_dir, value)
            )
            i += 2
            continue
        if value is not None and (arg in _HYDRA_VALUE_FLAGS or (arg in ("--info", "-i") and value in _INFO)):
            i += 2  # a Hydra flag's value (--cfg job), not an override
            continue
        if not arg.startswith("-") and not arg.startswith("hydra"):
            overrides.append(arg)
        i += 1
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
            compose(config_name=config_name, overrides=[*overrides, search_path()])
    except (HydraException, ValueError, yaml.YAMLError) as err:
        return one_line(err)
    finally:
        GlobalHydra.instance().clear()
    return None


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool = True) -> Iterator[None]:
    """Send everything written to stdout inside to stderr, at the file-descriptor level (verl's
    ``print``s and anything a library writes from C alike), so that with ``--print-config`` stdout
    carries only the YAML printed after it."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
