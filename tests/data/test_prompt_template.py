"""A user's Jinja prompt template replaces the built-in instructions everywhere prompts are built."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vlcal_verl.data.schema import chat_messages, make_row, prompt_text
from vlcal_verl.protocol import PROMPT_TEMPLATE_ENV, build_prompt, load_prompt_template


@pytest.fixture
def template(tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("Question: {{ content | trim }}\n\nReply as <think>…</think> then \\boxed{}.\n")
    return path


def test_template_renders_the_question(template):
    assert build_prompt("  How many?  ", template=load_prompt_template(template)) == (
        "Question: How many?\n\nReply as <think>…</think> then \\boxed{}."
    )


def test_env_template_reaches_rows_and_chat_messages(template, monkeypatch):
    from PIL import Image

    monkeypatch.setenv(PROMPT_TEMPLATE_ENV, str(template))
    row = make_row(
        question="Is it red?", answer="yes", images=[Image.new("RGB", (8, 8))], data_source="t",
        answer_kind="yes_no", index=0, uid="u",
    )  # fmt: skip
    assert (
        row["prompt"][0]["content"]
        == "<image>\nQuestion: Is it red?\n\nReply as <think>…</think> then \\boxed{}."
    )
    # the chat turn the warm start and `vlcal eval` build is the same text
    assert (
        chat_messages("Is it red?")[0]["content"][-1]["text"]
        == prompt_text("Is it red?").split("<image>")[-1]
    )
    monkeypatch.delenv(PROMPT_TEMPLATE_ENV)
    assert "First think" in build_prompt("Is it red?")  # the built-in instructions again


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no question here", "never uses {{ content }}"),
        ("{{ content }} and {{ other }}", r"unknown variables \['other'\]"),
        ("{% if %}", "line 1"),
    ],
)
def test_unusable_templates_are_named(tmp_path, text, message):
    path = tmp_path / "t.jinja"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_prompt_template(path)


def test_cli_refuses_a_bad_template_before_any_work(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "vlcal_verl.cli", "data", "bench", "easy-vqa", "--out", str(tmp_path / "o"),
         "--prompt-template", str(tmp_path / "missing.jinja")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "no such file" in out.stderr and not (tmp_path / "o").exists()


def test_eval_refuses_a_bad_template_before_loading_a_model(tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("no question")
    out = subprocess.run(
        [sys.executable, "-m", "vlcal_verl.cli", "eval", "--model", "tiny:qwen3-vl", "--bench", "easy-vqa",
         "--out", str(tmp_path / "r"), "--prompt-template", str(bad)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "never uses {{ content }}" in out.stderr and not (tmp_path / "r").exists()
