"""Benchmark `python -m hvdbert.prepare` on a large corpus against HF run_mlm.py's tokenize + group_texts.

    .venv/bin/python bench/prepare_bench.py [--corpus-mb 1024] [--peer-mb 256] [--workdir DIR] [--json FILE]

The corpus is the embedded corpus written out as plain text (documents separated by blank lines)
and repeated until it is --corpus-mb megabytes. A WordPiece tokenizer (30522 tokens) is trained
once on the embedded corpus and given to both sides, so neither times tokenizer training.

- hvdbert: `python -m hvdbert.prepare --input corpus.txt --tokenizer ... --seq-len 128` in a child
  process; the peak RSS of its process tree is sampled every 0.1 s.
- run_mlm.py's approach (transformers examples/pytorch/language-modeling, without --line_by_line):
  `load_dataset("text")`, `map(tokenize_function, batched=True)` with return_special_tokens_mask,
  `map(group_texts, batched=True)` into blocks of 128, in a child process, on the first --peer-mb
  megabytes of the same file (it writes the whole tokenized corpus to its cache, several times the
  text's size).

Both sides are compared in tokens per CPU-second (user + system time of the child and its threads
and processes): "tokens/s per core", independent of how many cores each side managed to use.
Not a test: it takes minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_corpus(path: Path, megabytes: int) -> int:
    """The embedded corpus, blank-line separated, repeated to `megabytes`; returns its size in bytes."""
    from hvdbert.data.corpus import builtin_documents

    one_pass = "\n\n".join(d.strip() for d in builtin_documents()).encode("utf-8") + b"\n\n"
    target = megabytes << 20
    with open(path, "wb") as f:
        written = 0
        while written < target:
            chunk = one_pass[: target - written]
            f.write(chunk)
            written += len(chunk)
    return written


def run_measured(command: list[str], env: dict) -> dict:
    """Run a child; return wall seconds, CPU seconds and the peak RSS of its whole process tree."""
    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0}

    def sample() -> None:
        try:
            parent = psutil.Process(child.pid)
            while child.poll() is None:
                try:
                    tree = [parent, *parent.children(recursive=True)]
                    peak["rss"] = max(peak["rss"], sum(p.memory_info().rss for p in tree if p.is_running()))
                except psutil.Error:
                    pass
                time.sleep(0.1)
        except psutil.Error:
            pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = child.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({child.returncode}):\n{output[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_bytes": peak["rss"],
            "max_process_rss_bytes": (after.ru_maxrss << 10), "output": output.strip().splitlines()[-1:]}


def peer(corpus: Path, tokenizer_dir: Path, cache_dir: Path, seq_len: int, num_proc: int) -> None:
    """run_mlm.py's preprocessing, as its script does it (child process entry point)."""
    from itertools import chain

    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    tokenizer.model_max_length = 1 << 30  # run_mlm.py cuts with group_texts, not the tokenizer
    raw = datasets.load_dataset("text", data_files={"train": str(corpus)}, cache_dir=str(cache_dir))["train"]

    def tokenize_function(examples):
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    def group_texts(examples):  # run_mlm.py's
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // seq_len) * seq_len
        return {k: [t[i: i + seq_len] for i in range(0, total_length, seq_len)] for k, t in concatenated.items()}

    tokenized = raw.map(tokenize_function, batched=True, num_proc=num_proc, remove_columns=["text"])
    grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc)
    print(json.dumps({"sequences": len(grouped), "tokens": len(grouped) * seq_len}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus-mb", type=int, default=1024)
    parser.add_argument("--peer-mb", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--num-proc", type=int, default=1, help="both sides")
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory, removed at the end")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--peer-child", nargs=3, metavar=("CORPUS", "TOKENIZER", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_child:
        peer(*map(Path, args.peer_child), args.seq_len, args.num_proc)
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="hvdbert-prepare-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    try:
        from hvdbert.data.corpus import builtin_documents
        from hvdbert.data.tokenizer import train_wordpiece

        tokenizer_dir = workdir / "tokenizer"
        if not (tokenizer_dir / "tokenizer.json").is_file():
            train_wordpiece(builtin_documents(), 30522).save_pretrained(str(tokenizer_dir))
        corpus = workdir / f"corpus-{args.corpus_mb}mb.txt"
        if not corpus.is_file() or corpus.stat().st_size != args.corpus_mb << 20:
            write_corpus(corpus, args.corpus_mb)
        peer_corpus = workdir / f"corpus-{args.peer_mb}mb.txt"
        if not peer_corpus.is_file() or peer_corpus.stat().st_size != args.peer_mb << 20:
            write_corpus(peer_corpus, args.peer_mb)

        output = workdir / "prepared"
        shutil.rmtree(output, ignore_errors=True)
        ours = run_measured([sys.executable, "-m", "hvdbert.prepare", "--input", str(corpus), "--output", str(output),
                             "--tokenizer", str(tokenizer_dir), "--seq-len", str(args.seq_len),
                             "--num-proc", str(args.num_proc)], env)
        manifest = json.loads((output / "manifest.json").read_text())
        ours["tokens"] = manifest["num_tokens"] + manifest["dropped_tokens"]
        ours["sequences"] = manifest["num_sequences"]

        cache = workdir / "peer-cache"
        shutil.rmtree(cache, ignore_errors=True)
        theirs = run_measured([sys.executable, __file__, "--seq-len", str(args.seq_len), "--num-proc",
                               str(args.num_proc), "--peer-child", str(peer_corpus), str(tokenizer_dir), str(cache)], env)
        theirs.update(json.loads(theirs.pop("output")[-1]))
        shutil.rmtree(cache, ignore_errors=True)

        for side in (ours, theirs):
            side["tokens_per_s"] = side["tokens"] / side["seconds"]
            side["tokens_per_cpu_s"] = side["tokens"] / side["cpu_seconds"]
        result = {
            "corpus_bytes": corpus.stat().st_size, "peer_corpus_bytes": peer_corpus.stat().st_size,
            "cores": os.cpu_count(), "seq_len": args.seq_len, "hvdbert": ours, "run_mlm": theirs,
            "tokens_per_cpu_s_ratio": ours["tokens_per_cpu_s"] / theirs["tokens_per_cpu_s"],
            "peak_rss_gib": ours["peak_rss_bytes"] / 2**30,
        }
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        ok = result["tokens_per_cpu_s_ratio"] >= 1.0 and result["peak_rss_gib"] < 2.0
        print(f"hvdbert {ours['tokens_per_cpu_s']:,.0f} tokens per CPU-second vs run_mlm.py's "
              f"{theirs['tokens_per_cpu_s']:,.0f} (ratio {result['tokens_per_cpu_s_ratio']:.2f}); "
              f"peak RSS {result['peak_rss_gib']:.2f} GiB preparing {result['corpus_bytes'] / 2**30:.2f} GiB: "
              f"{'within' if ok else 'OUTSIDE'} the targets (ratio >= 1, RSS < 2 GiB)")
        return 0 if ok else 1
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
