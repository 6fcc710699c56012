"""``vlcal judge``: ask a vision chat model whether each item's ``<vision>`` description fits its image.

    vlcal judge --generations reports/ckpt/generations.jsonl --data-dir data/bench \\
        --api-base http://judge-host:8000/v1 --model Qwen2.5-VL-72B-Instruct --concurrency 16
    vlcal eval --generations reports/ckpt/generations.jsonl --judgments reports/ckpt/visual_judgments.json ...

Any OpenAI-compatible endpoint (vLLM's ``serve``, SGLang, a hosted API) that takes images in chat
messages: one ``POST {api-base}/chat/completions`` per item, the image(s) as PNG data URLs, temperature 0.
The answer's first word decides: ``yes`` → 1 (faithful), ``no`` → 0. The output is the judgments file
``vlcal eval --judgments`` reads, ``{uid: 0|1}``; it is saved as results arrive, and a rerun skips the
uids already in it (so a run cut short, or items that failed, continue where they stopped).

Every request has a finite timeout; timeouts, connection errors, HTTP 429 and 5xx are retried
``--retries`` times with a short backoff; a reply that cannot be read (not JSON, no choices, neither yes
nor no) is counted and the item is left unjudged. Nothing of this stops the run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

PROMPT = (
    "Another model looked at the attached image and wrote the description below. Check it against the "
    "image. Answer yes if everything the description states about the image is actually visible and "
    "correct (leaving details out is fine). Answer no if it states anything that is wrong or not in the "
    "image, such as a wrong object, colour, count, text, number or position.\n\n"
    "Reply with a single word: yes or no.\n\nDescription:\n{description}"
)
SAVE_EVERY = 25  # results between saves of the judgments file
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generations", type=Path, required=True, help="a report's generations.jsonl")
    p.add_argument("--api-base", required=True, help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    p.add_argument("--model", required=True, help="the judge model's name at that endpoint")
    p.add_argument(
        "--data-dir", type=Path, default=None, help="folder of `vlcal data bench` NAME.parquet (images)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="judgments JSON (default: visual_judgments.json beside --generations)",
    )
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=2, help="extra attempts after a timeout / 429 / 5xx")
    p.add_argument("--limit", type=int, default=None, help="judge at most this many items (after resuming)")
    p.add_argument(
        "--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key (if any)"
    )
    p.add_argument("--max-tokens", type=int, default=8, help="reply length the judge may use")


from vlcal_verl.commands.eval import UsageError  # noqa: E402 (one user-mistake type for the commands)

# ----------------------------------------------------------------------------- pieces


def parse_verdict(content: Any) -> int | None:
    """1 for yes, 0 for no, None when the reply says neither (first word, case and punctuation ignored).

    >>> [parse_verdict(s) for s in ("Yes.", "**no**", " NO, it is blue", "maybe", "", None)]
    [1, 0, 0, None, None, None]
    """
    if not isinstance(content, str):
        return None
    words = re.findall(r"[a-z]+", content.lower())
    if not words or words[0] not in ("yes", "no"):
        return None
    return 1 if words[0] == "yes" else 0


def _data_url(image: Any) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request_body(model: str, description: str, images: list[Any], max_tokens: int = 8) -> dict[str, Any]:
    """The chat completion request: the images, then the instruction with the description."""
    content = [{"type": "image_url", "image_url": {"url": _data_url(im)}} for im in images]
    content.append({"type": "text", "text": PROMPT.format(description=description.strip())})
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0.0,
        "max_tokens": max_tokens,
    }


def read_judgments(path: Path) -> dict[str, int]:
    """The judgments already in ``path`` (a rerun resumes them); a file that is not a judgments file
    (e.g. a report's metrics.json) is refused rather than counted and rewritten."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"--out {path}: exists but is not a judgments JSON ({err}); move it away") from None
    if not isinstance(data, dict):
        raise UsageError(f"--out {path}: exists but is not a JSON object {{uid: 0|1}}; move it away")
    bad = next(((k, v) for k, v in data.items() if isinstance(v, bool) or v not in (0, 1)), None)
    if bad is not None:
        raise UsageError(
            f"--out {path}: exists but is not a judgments file {{uid: 0|1}} (key {bad[0]!r} holds "
            f"{json.dumps(bad[1])[:40]}); choose another --out or move it away"
        )
    return data


def save_judgments(path: Path, judgments: dict[str, int]) -> None:
    """Write atomically (temp file + rename): a run killed mid-save keeps the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dict(sorted(judgments.items())), indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _read_rows(path: Path) -> list[dict]:
    from vlcal_verl.commands.eval import read_jsonl_rows

    if not path.is_file():
        raise UsageError(f"--generations {path}: no such file")
    return read_jsonl_rows(path, ("uid", "response"), " (a `vlcal eval` generations.jsonl)", allow_empty=True)


def _image_sources(rows: list[dict], data_dir: Path | None) -> dict[str, Path | None]:
    """benchmark → its parquet (None: offline easy-vqa); a missing one is a usage error."""
    from vlcal_verl.commands.eval import BENCHES

    out: dict[str, Path | None] = {}
    for name in dict.fromkeys(str(r.get("benchmark", "")) for r in rows):
        if name in BENCHES:
            out[name] = None
            continue
        path = (data_dir or Path(".")) / f"{name}.parquet"
        if not path.is_file():
            raise UsageError(
                f"benchmark {name!r}: no {path} for its images; pass --data-dir (the folder `vlcal eval` read)"
            )
        out[name] = path
    return out


def load_images(sources: dict[str, Path | None], uids: set[str]) -> dict[str, list[Any]]:
    """uid → the item's images, for the benchmarks in ``sources``."""
    from vlcal_verl.commands.eval import BENCHES
    from vlcal_verl.data.easy_vqa import load_easy_vqa
    from vlcal_verl.evaluation.generate import _images, load_bench_items

    out: dict[str, list[Any]] = {}
    for name, path in sources.items():
        items = load_easy_vqa("test", **BENCHES[name]) if path is None else load_bench_items(path)
        out.update({it.uid: _images(it) for it in items if it.uid in uids})
    return out


# ----------------------------------------------------------------------------- requests


async def _ask(client: Any, url: str, body: dict, retries: int) -> tuple[int | None, str]:
    """(verdict, outcome) for one item; outcome is 'ok', 'timeout', 'connection', 'http NNN', 'garbage'."""
    import httpx

    outcome = "timeout"
    for attempt in range(retries + 1):
        if attempt:
            await asyncio.sleep(min(0.25 * 2 ** (attempt - 1), 4.0))
        try:
            resp = await client.post(url, json=body)
        except httpx.TimeoutException:
            outcome = "timeout"
            continue
        except httpx.TransportError:
            outcome = "connection"
            continue
        if resp.status_code in RETRY_STATUS:
            outcome = f"http {resp.status_code}"
            continue
        if resp.status_code != 200:
            return None, f"http {resp.status_code}"
        try:
            content = resp.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None, "garbage"
        verdict = parse_verdict(content)
        return (verdict, "ok") if verdict is not None else (None, "garbage")
    return None, outcome


async def judge_all(
    jobs: list[tuple[str, dict]],
    api_base: str,
    judgments: dict[str, int],
    out: Path,
    *,
    concurrency: int = 8,
    timeout: float = 120.0,
    retries: int = 2,
    api_key: str | None = None,
) -> Counter:
    """Send every (uid, request body); verdicts go into ``judgments`` (saved to ``out`` as they come).
    Returns the outcome counts."""
    import httpx
    from tqdm import tqdm

    url = api_base.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    counts: Counter = Counter()
    sem = asyncio.Semaphore(concurrency)
    since_save = 0

    async def one(uid: str, body: dict) -> None:
        nonlocal since_save
        async with sem:
            verdict, outcome = await _ask(client, url, body, retries)
        counts[outcome] += 1
        bar.update(1)
        bar.set_postfix(ok=counts["ok"], failed=sum(counts.values()) - counts["ok"], refresh=False)
        if verdict is not None:
            judgments[uid] = verdict
            since_save += 1
            if since_save >= SAVE_EVERY:
                save_judgments(out, judgments)
                since_save = 0

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with tqdm(total=len(jobs), desc="judge", unit="item") as bar:
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(timeout), limits=limits, headers=headers
        ) as client:
            try:
                await asyncio.gather(*(one(uid, body) for uid, body in jobs))
            finally:
                save_judgments(out, judgments)
    return counts


def _validate(args: argparse.Namespace) -> tuple[list[dict], Path, dict[str, int]]:
    if not re.match(r"^https?://[^/\s]+", args.api_base):
        raise UsageError(f"--api-base {args.api_base!r}: give an http(s) URL such as http://host:8000/v1")
    for flag, v, low in (
        ("--concurrency", args.concurrency, 1),
        ("--retries", args.retries, 0),
        ("--max-tokens", args.max_tokens, 1),
    ):
        if v < low:
            raise UsageError(f"{flag} must be >= {low}, got {v}")
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise UsageError(f"--data-dir {args.data_dir}: no such folder")
    rows = _read_rows(args.generations)
    out = args.out or args.generations.with_name("visual_judgments.json")
    if out.exists() and not out.is_file():
        raise UsageError(f"--out {out}: exists and is not a file")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise UsageError(f"--out {out}: folder {out.parent} does not exist or is not writable")
    return rows, out, read_judgments(out)


def run(args: argparse.Namespace) -> int:
    from vlcal_verl.protocol import parse_response

    try:
        rows, out, judgments = _validate(args)
        todo, no_description = [], 0
        for r in rows:
            if r["uid"] in judgments:
                continue
            vision = parse_response(r["response"]).vision
            if not vision or not vision.strip():
                no_description += 1
                continue
            todo.append((r, vision))
        todo = todo[: args.limit] if args.limit is not None else todo
        sources = _image_sources([r for r, _ in todo], args.data_dir)
    except UsageError as err:
        print(f"vlcal judge: {err}", file=sys.stderr)
        return 2
    images = load_images(sources, {r["uid"] for r, _ in todo})
    jobs, no_image = [], 0
    for r, vision in todo:
        if r["uid"] not in images:
            no_image += 1
            continue
        jobs.append((r["uid"], request_body(args.model, vision, images[r["uid"]], args.max_tokens)))
    skipped = len(rows) - len(todo) - no_description
    print(
        f"vlcal judge: {len(jobs)} to judge, {skipped} already in {out}, {no_description} without a "
        f"<vision> description, {no_image} without an image",
        file=sys.stderr,
    )
    counts: Counter = Counter()
    if jobs:
        key = os.environ.get(args.api_key_env) if args.api_key_env else None
        counts = asyncio.run(
            judge_all(
                jobs,
                args.api_base,
                judgments,
                out,
                concurrency=args.concurrency,
                timeout=args.timeout,
                retries=args.retries,
                api_key=key,
            )
        )
    elif not out.exists():
        save_judgments(out, judgments)
    failed = {k: v for k, v in sorted(counts.items()) if k != "ok"}
    print(
        f"judged {counts['ok']}; failed {sum(failed.values())} {failed or ''}; "
        f"{out} holds {len(judgments)} judgments (rerun to retry the failed ones)".replace(" ;", ";")
    )
    return 1 if jobs and not counts["ok"] else 0
