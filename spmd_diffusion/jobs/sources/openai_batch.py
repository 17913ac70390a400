"""OpenAI batch files: the .jsonl that ``client.batches.create`` takes, for image requests.

Each line is ``{"custom_id": ..., "method": "POST", "url": "/v1/images/generations",
"body": {...}}``, the body what the images API takes: ``prompt``, ``n`` (images for this
prompt), ``size`` ("WxH"), ``model``, ``response_format`` and ``quality``/``style`` (kept as
metadata), plus the server's extensions ``negative_prompt``, ``num_inference_steps``,
``guidance_scale`` and ``seed``. ``custom_id`` becomes the item's id; keys the job does not
use are kept in the manifest under ``meta``. A file already written for OpenAI runs as is.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spmd_diffusion.errors import InputError
from spmd_diffusion.jobs.prompts import PromptItem, _item, parse_json_line, text_lines

IMAGES_URL = "/v1/images/generations"
SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
# body key -> prompt-file key (the names _item knows)
BODY_KEYS = {
    "negative_prompt": "negative_prompt",
    "num_inference_steps": "steps",
    "guidance_scale": "guidance",
    "seed": "seed",
}


def _size(value: Any, where: str) -> dict[str, int]:
    """OpenAI's "WxH" (width first) as height and width; "auto"/absent: the run's own."""
    if value in (None, "auto"):
        return {}
    match = SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise InputError(f"{where}: size {value!r} must be 'WIDTHxHEIGHT', e.g. '512x512'")
    return {"width": int(match.group(1)), "height": int(match.group(2))}


def openai_item(record: Any, number: int, where: str) -> PromptItem:
    """The item of one batch line."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: each line must be a JSON object (an OpenAI batch request)")
    custom_id, body = record.get("custom_id"), record.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        raise InputError(f"{where}: 'custom_id' is required and must be a non-empty string")
    url = record.get("url", IMAGES_URL)
    if url != IMAGES_URL or record.get("method", "POST") != "POST":
        raise InputError(
            f"{where}: only POST {IMAGES_URL} requests can run here, not "
            f"{record.get('method', 'POST')} {url}"
        )
    if not isinstance(body, dict):
        raise InputError(f"{where}: 'body' must be a JSON object (the images request)")
    fields = {"id": custom_id, "prompt": body.get("prompt"), **_size(body.get("size"), where)}
    fields.update(
        {key: body[name] for name, key in BODY_KEYS.items() if body.get(name) is not None}
    )
    item = _item(fields, number, where)
    item.meta = {
        key: value for key, value in body.items() if key not in ("prompt", "size", "n", *BODY_KEYS)
    }
    count = body.get("n")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InputError(f"{where}: n must be a positive integer, not {count!r}")
        item.settings["num_images_per_prompt"] = count
    return item


def read_openai_batch(path: Path) -> Iterator[PromptItem]:
    for number, text in text_lines(path):
        if text.strip():
            where = f"{path}:{number}"
            yield openai_item(parse_json_line(text, where), number, where)
