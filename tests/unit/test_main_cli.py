"""``python -m vlcal_verl.main``'s command line: ``--recipe`` composes exactly the file named (or refuses it in
one line), ``--recipe=FILE`` works, ``--help`` documents the flags, ``--print-config`` writes YAML and
nothing else to stdout, a broken recipe is one line naming file and line, and the README's command lines
run exactly as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "qwen3_vl_4b.yaml"


def _main(args: list[str], cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlcal_verl.main", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs,
    )  # fmt: skip


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "config OK" not in out.stdout + out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr[-2000:]
    return lines[0]


def _recipe(folder: Path, name: str, experiment: str) -> Path:
    """A copy of the 4B recipe under ``name`` whose run is called ``experiment``."""
    text = RECIPE.read_text().replace("experiment_name: qwen3_vl_4b", f"experiment_name: {experiment}")
    assert f"experiment_name: {experiment}" in text
    (folder / name).write_text(text)
    return folder / name


@pytest.mark.parametrize("name", ["exp.yml", "exp.yaml.bak", "notyaml.txt", "exp.YAML"])
def test_recipe_not_named_yaml_is_refused_not_swapped(tmp_path, name):
    """Hydra appends .yaml to the config name: ``exp.yml`` used to compose ``exp.yaml`` beside it."""
    _recipe(tmp_path, "exp.yaml", "the_other_file")
    _recipe(tmp_path, "notyaml.yaml", "the_other_file")
    named = _recipe(tmp_path, name, "the_named_file")
    line = _one_error_line(_main(["--check", "--recipe", str(named)], cwd=tmp_path))
    assert line.startswith(f"[vlcal] --recipe {named}: not a .yaml file"), line
    assert "Cannot find primary config" not in line


def test_recipe_equals_form_composes_exactly_the_named_file_and_stdout_is_yaml(tmp_path):
    """``--recipe=FILE`` like ``--recipe FILE``; a dotted name next to a shorter one picks the named file;
    with ``--print-config`` stdout parses as YAML, the summary and verl's lines are on stderr."""
    _recipe(tmp_path, "exp.yaml", "the_other_file")
    named = _recipe(tmp_path, "exp.v2.yaml", "the_named_file")
    out = _main(["--check", "--print-config", f"--recipe={named}", "ablation=rlcr"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    config = yaml.safe_load(out.stdout)
    assert config["trainer"]["experiment_name"] == "the_named_file-rlcr"
    assert config["vlcal"]["ablation"] == "rlcr" and config["vlcal"]["reward"]["w_brier"] == 0.8
    assert "[vlcal] config OK" in out.stderr and "[validate_config]" in out.stderr
    assert sorted(tmp_path.iterdir()) == [tmp_path / "exp.v2.yaml", tmp_path / "exp.yaml"]  # writes nothing


def test_help_documents_the_flags():
    out = _main(["--help"])
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--recipe FILE.yaml", "--check", "--print-config"):
        assert flag in out.stdout
    assert "exactly this file" in out.stdout and "stdout is exactly the composed" in out.stdout


def test_recipe_without_a_value_is_one_line():
    line = _one_error_line(_main(["--check", "--recipe"]))
    assert line == "[vlcal] argument --recipe: expected one argument (see --help)"


@pytest.mark.parametrize(
    ("text", "lineno", "problem"),
    [
        ("defaults:\n  - vlcal_trainer\n  - _self_\ntrainer: [\n", 5, "expected the node content"),
        ("defaults:\n  - vlcal_trainer\n  - _self_\na: 1\nb: 2\na: 3\n", 6, "found duplicate key a"),
        (
            "defaults:\n  - vlcal_trainer\n  - _self_\ntrainer:\n  nnodes: 1\n nodes: 2\n",
            6,
            "expected <block end>",
        ),
    ],
)
def test_invalid_yaml_recipe_is_one_line_with_file_and_line(tmp_path, text, lineno, problem):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    line = _one_error_line(_main(["--check", "--recipe", str(bad)], cwd=tmp_path))
    assert line.startswith(f"[vlcal] config error: invalid YAML in {bad} line {lineno}: "), line
    assert problem in line


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def test_readme_print_config_line_runs_as_written_and_writes_yaml():
    """The README's ``... --print-config ... > run.yaml`` line, through a shell, in the repository root."""
    lines = [
        ln.strip()
        for ln in _readme_section("Training on a GPU cluster").splitlines()
        if "--print-config" in ln and "> run.yaml" in ln
    ]
    assert len(lines) == 1, lines
    target = ROOT / "run.yaml"
    saved = target.read_bytes() if target.exists() else None
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        out = subprocess.run(
            lines[0], shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-3000:]
        config = yaml.safe_load(target.read_text())
    finally:
        if saved is None:
            target.unlink(missing_ok=True)
        else:
            target.write_bytes(saved)
    assert config["trainer"]["experiment_name"] == "qwen3_vl_4b"
    assert config["actor_rollout_ref"]["actor"]["policy_loss"]["loss_mode"] == "vlcal_perception"  # wired
    assert config["vlcal"]["variant"] == "authors" and config["vlcal"]["vce"]["mask_cell_px"] == 0
    assert "[vlcal] config OK" in out.stderr and "[vlcal] package:" in out.stderr


OVERRIDE = re.compile(r"`([+~]?[A-Za-z_][\w.]*=[^`\s]+)`")


@pytest.mark.slow  # ~40 s: one --check per override
def test_readme_reproduction_overrides_pass_check_as_written(monkeypatch, capsys):
    """Every ``key=value`` the "Reproducing the paper" section shows, on the 4B recipe, through ``main``'s
    ``--check`` (in this process: the same code path, without paying verl's import per override)."""
    from vlcal_verl import main as vlcal_main

    overrides = sorted(set(OVERRIDE.findall(_readme_section("Reproducing the paper"))))
    for expected in ("vlcal.vce.mask_cell_px=14", "variant=exact", "ablation=rlcr", "ablation=vce_kl"):
        assert expected in overrides, overrides
    assert len(overrides) >= 12, overrides
    for name in ("VLCAL_CHECK_ONLY", "VLCAL_PRINT_CONFIG"):
        monkeypatch.setenv(name, "0")  # restored afterwards: main() sets them
    monkeypatch.chdir(ROOT)
    failed = {}
    for override in overrides:
        monkeypatch.setattr(sys, "argv", [sys.argv[0]])
        try:
            vlcal_main.main(["--check", "--recipe", "recipes/qwen3_vl_4b.yaml", override])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        captured = capsys.readouterr()
        if code != 0 or "[vlcal] config OK" not in captured.out:
            failed[override] = (code, captured.err.strip().splitlines()[-1:])
    assert not failed, failed


@pytest.mark.parametrize("name", ["recipes/qwen3_vl_4b.yml", "recipes/qwen3_vl_4b.yaml.bak"])
def test_submit_sh_refuses_a_recipe_not_named_yaml(name):
    """launch/submit.sh passes the path to the job, where main would refuse it after the queue wait: it
    refuses a non-.yaml name itself, before submitting."""
    out = subprocess.run(
        [str(ROOT / "launch" / "submit.sh"), "--recipe", name, "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert (
        out.stderr.strip()
        == f"submit.sh: --recipe {name}: not a .yaml file (python -m vlcal_verl.main composes only *.yaml recipes)"
    )


def test_hydra_flags_with_values_pass_through():
    """``--cfg job`` (Hydra prints the composed job config and stops): its value is not an override."""
    out = _main(["--recipe", str(RECIPE), "--cfg", "job", "--package", "vlcal.reward", "ablation=rlcr"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert yaml.safe_load(out.stdout.split("\n", 1)[1])["w_brier"] == 0.8  # after '# @package vlcal.reward'


def test_submit_sh_refuses_a_recipe_ray_would_not_ship(tmp_path):
    """The job's working_dir is the repository as Ray packs it: a git-ignored recipe, or one matching
    the runtime env's excludes, would be "no such file" on the cluster after the queue wait."""
    submit = [str(ROOT / "launch" / "submit.sh"), "--dry-run", "--recipe"]
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text("excludes:\n  - /recipes/qwen3_vl_8b.yaml\n  - '**/__pycache__/'\n")
    env = {**os.environ, "VLCAL_RUNTIME_ENV": str(env_file), "VLCAL_PYTHON": sys.executable}
    out = subprocess.run(
        [*submit, "recipes/qwen3_vl_8b.yaml"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 2, out.stderr
    assert "matches '/recipes/qwen3_vl_8b.yaml'" in out.stderr and "does not ship it" in out.stderr
    out = subprocess.run(
        [*submit, "recipes/qwen3_vl_4b.yaml"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0 and "--recipe recipes/qwen3_vl_4b.yaml" in out.stdout, out.stderr
    ignored = ROOT / "runs" / f"zz_submit_test_{os.getpid()}.yaml"  # runs/ is git-ignored
    ignored.parent.mkdir(exist_ok=True)
    shutil.copy(RECIPE, ignored)
    try:
        out = subprocess.run(
            [*submit, str(ignored.relative_to(ROOT))], cwd=ROOT, env=env, capture_output=True, text=True
        )
    finally:
        ignored.unlink()
    assert out.returncode == 2 and "is git-ignored" in out.stderr, out.stderr


def test_bypass_mode_with_distribution_entropy_is_refused_before_ray():
    """verl's rollout-correction bypass skips the old-log-prob pass, so no per-token entropy exists: the exact
    variant (H_t = distribution entropy for VCE and TAR) is refused in one line at ``--check`` (found by the
    CPU loop, where the run crashed after step 1's generation); the authors' variant (H_t = −log p) passes."""
    bypass = "algorithm.rollout_correction.bypass_mode=true"

    def config_error(out: subprocess.CompletedProcess) -> str:  # after verl's import warnings
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        (line,) = [ln for ln in out.stderr.splitlines() if "[vlcal] config error" in ln]
        return line

    line = config_error(_main(["--check", "--recipe", str(RECIPE), "variant=exact", bypass]))
    assert "bypass_mode=true" in line and "vlcal.vce.entropy=distribution" in line
    assert "vlcal.tar.entropy=distribution" in line and "vlcal.vce.entropy=nll vlcal.tar.entropy=nll" in line
    tar_only = ["variant=exact", "vlcal.vce.entropy=nll", bypass]
    line = config_error(_main(["--check", "--recipe", str(RECIPE), *tar_only]))
    assert "vlcal.tar.entropy=distribution" in line and "vlcal.vce.entropy=distribution" not in line
    ok = _main(["--check", "--recipe", str(RECIPE), bypass])
    assert ok.returncode == 0 and "config OK" in ok.stdout + ok.stderr, ok.stderr[-2000:]
