"""Agreement at start-up: every rank must train (or evaluate) on what rank 0 does.

Nothing else makes sure of it. With the embedded corpus each host prepares its own copy; with
`--data`, each host reads its own mount; `mpirun`'s multiple-program form can give ranks different
flags. A rank with other data (another tokenizer, say) still trains and the job still exits 0: the
gradients of two vocabularies are averaged, silently. So before anything is written, each rank
sends a few fingerprints (sha256 sums of small files) in one allgather, every rank compares them
with rank 0's, and on any difference every rank stops with exit status 2; rank 0 says, in one line,
which rank on which host differs, and in what.
"""
from __future__ import annotations

import hashlib
import json
import socket
import sys
from pathlib import Path

from hvdbert import checkpoint
from hvdbert.data.shards import MANIFEST, PreparedData
from hvdbert.data.tokenizer import tokenizer_hash

# What each fingerprint covers, for the message; the order is the order of the checks.
WHAT = {
    "manifest": "prepared data (manifest.json: shards and their sha256)",
    "tokenizer": "tokenizer files",
    "eval_manifest": "evaluation data (manifest.json)",
    "recipe": "resolved recipe",
    "resume": "checkpoint to resume from",
    "init_from": "checkpoint.init_from checkpoint",
    "evaluated": "checkpoint or model evaluated",
}
# Paths differ from host to host for the same content (a per-host HVDBERT_CACHE, a recipe copied
# elsewhere): they are left out of the recipe's fingerprint; the data is compared by content.
PATH_KEYS = ("data_dir", "source", "eval_data_dir")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    return _sha256(path.read_bytes()) if path.is_file() else "missing"


def data_fingerprints(data: PreparedData, prefix: str = "") -> dict[str, str]:
    """The manifest (which lists every shard's sha256 and the tokenizer's) and the tokenizer files."""
    found = {f"{prefix}manifest": _file_sha256(Path(data.directory) / MANIFEST)}
    if not prefix:
        found["tokenizer"] = tokenizer_hash(data.tokenizer_dir)
    return found


def recipe_fingerprint(resolved: dict) -> str:
    kept = {k: v for k, v in resolved.items() if k not in PATH_KEYS}
    return _sha256(json.dumps(kept, sort_keys=True, default=str).encode())


def evaluated_fingerprint(directory: Path) -> str:
    """A checkpoint (its state.json holds the sha256 of every other file) or a transformers model
    directory (its config.json) as this rank sees it."""
    state = directory / checkpoint.STATE
    return f"{directory.name} {_file_sha256(state if state.is_file() else directory / 'config.json')[:16]}"


def checkpoint_fingerprint(resume: str | None, run_dir: Path) -> str:
    """What `--resume` points at as this rank sees it: each candidate checkpoint's name and the
    sha256 of its state.json (which holds the sha256 of every other file in it)."""
    if not resume:
        return "none"
    if resume == "auto":
        candidates = [path for _, path in checkpoint.step_dirs(run_dir)]
        if not candidates:
            return "auto: no checkpoint"
    else:
        candidates = [Path(resume)]
    return "; ".join(f"{p.name} {_file_sha256(p / checkpoint.STATE)[:16]}" for p in candidates)


def fingerprints(data: PreparedData, resolved: dict, resume: str | None, run_dir: Path,
                 init_from: str = "", eval_data: PreparedData | None = None,
                 evaluated: Path | None = None) -> dict[str, str]:
    """This rank's fingerprints, in WHAT's order."""
    found = data_fingerprints(data)
    if eval_data is not None:
        found.update(data_fingerprints(eval_data, prefix="eval_"))
    found["recipe"] = recipe_fingerprint(resolved)
    found["resume"] = checkpoint_fingerprint(resume, run_dir)
    if init_from:
        found["init_from"] = checkpoint_fingerprint(init_from, run_dir)
    if evaluated is not None:
        found["evaluated"] = evaluated_fingerprint(evaluated)
    return found


def disagreement(gathered: list[dict]) -> str | None:
    """One line naming the first rank (and host) whose fingerprints differ from rank 0's, and how
    many ranks differ in all; None when every rank agrees."""
    reference = gathered[0]
    differing = [(rank, entry) for rank, entry in enumerate(gathered) if entry["fingerprints"] != reference["fingerprints"]]
    if not differing:
        return None
    rank, entry = differing[0]
    mine, theirs = entry["fingerprints"], reference["fingerprints"]
    key = next(k for k in list(WHAT) + sorted(set(mine) | set(theirs))
               if mine.get(k) != theirs.get(k))
    where = ""
    if key in ("manifest", "tokenizer", "eval_manifest"):
        directory = "eval_data_dir" if key.startswith("eval_") else "data_dir"
        where = f" (reads {entry[directory]}; rank 0 reads {reference[directory]})"
    more = f"; {len(differing) - 1} more rank(s) differ too" if len(differing) > 1 else ""
    return (f"rank {rank} (host {entry['host']}) has another {WHAT.get(key, key)} than rank 0 "
            f"(host {reference['host']}): {key} {_short(mine.get(key))} != {_short(theirs.get(key))}{where}{more}; "
            "every rank must start from the same data, recipe and checkpoint (prepare the data "
            "once on a shared file system, or with the same command and input on every host)")


def _short(value: str | None) -> str:
    if value is None:
        return "absent"
    return value[:12] if len(value) == 64 else repr(value)


def check_agreement(dist, data: PreparedData, resolved: dict, resume: str | None, run_dir: Path,
                    init_from: str = "", eval_data: PreparedData | None = None, evaluated: Path | None = None,
                    prog: str = "hvdbert.pretrain") -> None:
    """Stop every rank (exit status 2, before anything is written) unless all agree with rank 0.
    hvdbert.evaluate passes its held-out data as `data` and the checkpoint or model it evaluates.

    One allgather; each rank reaches the same verdict from the same gathered list, so none is left
    waiting. Rank 0 prints the line; the others exit quietly."""
    mine = {
        "host": socket.gethostname(),
        "data_dir": str(data.directory),
        "eval_data_dir": str(eval_data.directory) if eval_data is not None else "",
        "fingerprints": fingerprints(data, resolved, resume, run_dir, init_from, eval_data, evaluated),
    }
    gathered = dist.allgather_object(mine, name="startup_fingerprints")
    problem = disagreement(gathered)
    if problem is None:
        return
    if dist.rank == 0:
        print(f"{prog}: error: {problem}", file=sys.stderr, flush=True)
    # Every rank has decided to stop; the barrier keeps the others from exiting (and a launcher from
    # killing rank 0) before rank 0's line is out.
    dist.barrier()
    raise SystemExit(2)
