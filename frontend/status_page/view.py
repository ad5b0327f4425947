"""What the page draws: the queue's status file, with links to the files it may show and the user's requests.

The queue (or a single training) writes the status file; this module only reads it. Waiting jobs
are listed in the order the user asked for with the up/down buttons (``queue_control.json``), so a
click shows at once, before the queue reads the request when the running job ends.
"""

from __future__ import annotations

import json
import math
import os
import time
from urllib.parse import quote

from ..queue_control import QueueControl, ordered, read_control
from .files import servable_file

__all__ = ["read_status", "allowed_roots", "page_view", "file_url"]


def read_status(path: str) -> dict | None:
    """The status file, or None while it does not exist yet (or cannot be read)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _finite(value):
    """The document with NaN and infinities as null: a browser's JSON.parse refuses them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _jobs(status: dict | None) -> list[dict]:
    jobs = (status or {}).get("jobs")
    return [job for job in jobs if isinstance(job, dict)] if isinstance(jobs, list) else []


def allowed_roots(status: dict | None, folder: str) -> list[str]:
    """The folders the page may send files from: the queue's (or training's) folder and every job's output folder."""
    roots = [os.path.abspath(folder)]
    for job in _jobs(status):
        out = job.get("output_dir")
        if isinstance(out, str) and os.path.isabs(out):
            roots.append(out)
    return roots


def file_url(path: str) -> str:
    return "/file?path=" + quote(path, safe="")


def _links(job: dict, roots: list[str]) -> dict:
    samples = job.get("samples") if isinstance(job.get("samples"), list) else []
    shown = dict(job)
    shown["sample_urls"] = [file_url(p) for p in samples if isinstance(p, str) and servable_file(p, roots)]
    log = job.get("log")
    shown["log_url"] = file_url(log) if isinstance(log, str) and servable_file(log, roots) else None
    return shown


def _waiting_in_requested_order(jobs: list[dict], control: QueueControl) -> list[dict]:
    waiting = [job for job in jobs if job.get("state") == "waiting" and isinstance(job.get("name"), str)]
    by_name = {job["name"]: job for job in waiting}
    requested = iter(by_name[name] for name in ordered(list(by_name), control))
    slots = {id(job) for job in waiting}
    return [next(requested) if id(job) in slots else job for job in jobs]


def page_view(status_path: str, folder: str, *, queue: bool, now: float | None = None) -> dict:
    """The JSON the page polls: ``{"mode", "found", "now", "status", "control"}``."""
    status = _finite(read_status(status_path))
    control = read_control(folder) if queue else None
    roots = allowed_roots(status, folder)
    shown = dict(status or {})
    jobs = [_links(job, roots) for job in _jobs(status)]
    shown["jobs"] = _waiting_in_requested_order(jobs, control) if control else jobs
    return {
        "mode": "queue" if queue else "training",
        "folder": os.path.abspath(folder),
        "found": status is not None,
        "now": time.time() if now is None else now,
        "status": shown,
        "control": control.to_dict() if control else None,
    }
