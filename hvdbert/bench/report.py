"""The bench's report: the markdown table, the plot and the machine it ran on."""
from __future__ import annotations

import math
import os
import platform
import statistics
from pathlib import Path

import torch

SYSTEM_NAMES = {"hvdbert": "hvdbert (Horovod)", "hf": "HF Trainer (run_mlm)", "ddp": "PyTorch DDP (Gloo)",
                "ddp-hvdbert-model": "PyTorch DDP (Gloo), hvdbert's model and step"}


def _fmt(value, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _times(ratio) -> str:
    return "–" if ratio is None else f"{ratio:.2f}x"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| system | workers | seq/s | tokens/s | step ms | CPU ms/step | data wait ms | fwd+bwd ms | grad sync ms | "
        "optimizer ms | peak mem MiB | MFU | scaling eff. | vs HF Trainer | vs DDP | vs DDP, same model | "
        "CPU cost vs HF Trainer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = SYSTEM_NAMES[r["system"]] + r["label"][len(r["system"]):]
        b = r.get("breakdown_seconds") or {}
        ms = lambda key: _fmt(b[key] * 1000 if key in b and b[key] is not None else None, ".0f")  # noqa: E731
        lines.append(
            f"| {name} | {r['workers']} | {_fmt(r['seq_per_s'], '.2f')} | {_fmt(r['tokens_per_s'], ',.0f')} | "
            f"{_fmt(r['step_seconds'] * 1000, '.0f')} | {_fmt(r['cpu_seconds_per_step'] * 1000, '.0f')} | "
            f"{ms('data_wait')} | {ms('forward_backward')} | "
            f"{ms('gradient_sync')} | {ms('optimizer')} | {_fmt(r['peak_memory_bytes'] / 2**20, '.0f')} | "
            f"{_fmt(r.get('mfu') and 100 * r['mfu'], '.1f')}% | {_fmt(r['scaling_efficiency'], '.2f')} | "
            f"{_times(r['vs_hf'])} | {_times(r['vs_ddp'])} | {_times(r['vs_ddp-hvdbert-model'])} | "
            f"{_times(r['cpu_vs_hf'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in dict.fromkeys(r["label"] for r in rows):
        series = sorted((r for r in rows if r["label"] == label), key=lambda r: r["workers"])
        name = SYSTEM_NAMES[series[0]["system"]] + label[len(series[0]["system"]):]
        workers = [r["workers"] for r in series]
        left.plot(workers, [r["seq_per_s"] for r in series], marker="o", label=name)
        efficiency = [(r["workers"], r["scaling_efficiency"]) for r in series if r["scaling_efficiency"]]
        if efficiency:
            right.plot(*zip(*efficiency), marker="o", label=name)
    all_workers = sorted({r["workers"] for r in rows})
    left.set(xlabel="workers", ylabel="sequences / s", title="Throughput", xticks=all_workers)
    right.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    right.set(xlabel="workers", ylabel="seq/s at N / (N x seq/s at 1)", title="Scaling efficiency",
              xticks=all_workers, ylim=(0, 1.1))
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def shaped_table(rows: list[dict], baselines: list[dict], rounds: list[dict] = (), inputs: dict | None = None,
                 last_fraction: float = 0.0) -> str:
    """The shaped-cluster benchmark's table (bench/cluster.py): measured figures and the model's, and
    with more than one round per rate, each configuration's speed-ups within the rounds."""
    lines = ["| hosts | before link | 1 host alone seq/s | each of N at once, no communication: seq/s | "
             "load (1 min) |", "|---:|---|---:|---:|---|"]
    for b in baselines:
        lines.append(f"| {b['hosts']} | {b.get('link', '–')} | {b['alone_seq_per_s']:.2f} | "
                     f"{b['concurrent_seq_per_s']:.2f} | {', '.join(f'{v:.2f}' for v in b['load_average'])} |")
    lines += ["", "| link | hosts | system | step s | seq/s | allreduce wait s | exposed comm. s | wire s | "
              "overlapped | host CPU s/GB | wire MB/host/step (model) | packets/host/step | scaling eff. | "
              "model eff. | model error (points) | vs DDP |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        peer = next((p for p in rows if p["label"].startswith("ddp-hvdbert-model") and p["hosts"] == r["hosts"]
                     and p["link"] == r["link"] and p.get("compression") == r.get("compression")), None)
        versus = f"{r['seq_per_s'] / peer['seq_per_s']:.2f}x" if peer and r["system"] == "hvdbert" else "–"
        name = SYSTEM_NAMES[r["system"]] + r["label"][len(r["system"]):]
        lines.append(
            f"| {r['link']} | {r['hosts']} | {name} | {r['step_seconds']:.2f} | {r['seq_per_s']:.2f} | "
            f"{r['gradient_wait_seconds']:.2f} | {r['exposed_communication_seconds']:.2f} | {r['wire_seconds']:.2f} | "
            f"{_fmt(r['overlapped_fraction'], '.2f')} | {_fmt(r.get('host_cpu_seconds_per_gb'), '.2f')} | "
            f"{r['wire_bytes_per_host_per_step'] / 1e6:.1f} "
            f"({r['predicted_wire_bytes_per_host_per_step'] / 1e6:.1f}) | "
            f"{_fmt(r.get('wire_packets_per_host_per_step'), ',.0f')} | {r['scaling_efficiency']:.2f} | "
            f"{r['predicted_scaling_efficiency']:.2f} | {r['model_error_points']:+.1f} | {versus} |")
    if inputs:
        lines += ["", "The model's inputs measured here, per system (medians over its rows without --vary): " + "; ".join(
            f"{SYSTEM_NAMES[system]}: overlap {i['overlap']:.2f}, host CPU {i['host_cpu_seconds_per_gb']:.2f} s/GB"
            for system, i in inputs.items()) + f"; the input embeddings' share of the gradient, {last_fraction:.3f}."]
    if len({(r["hosts"], r["link"], r["round"]) for r in rounds}) > len({(r["hosts"], r["link"]) for r in rounds}):
        lines += ["", round_table(rounds)]
    return "\n".join(lines) + "\n"


def round_table(rounds: list[dict]) -> str:
    """Per host count, rate and configuration: the speed-up over plain hvdbert in each round (step
    time of plain hvdbert / this one's, same round), its median, and hvdbert's over DDP likewise, with
    that ratio's median and the rounds hvdbert was ahead in (a ratio above 1): rounds won about as
    often as lost say level within the noise, whatever the median."""
    lines = ["| link | hosts | system | step s per round | speed-up over plain hvdbert per round | median | "
             "vs DDP per round (same compression) |", "|---|---:|---|---|---|---:|---|"]
    for hosts, link in dict.fromkeys((r["hosts"], r["link"]) for r in rounds):
        mine = [r for r in rounds if r["hosts"] == hosts and r["link"] == link]
        for label in mine[0]["step_seconds"]:
            speedups = [r["speedup_vs_hvdbert"][label] for r in mine]
            versus = [r["hvdbert_vs_ddp"][label] for r in mine if label in r["hvdbert_vs_ddp"]]
            system = label.split(" ")[0]
            against = ", ".join(f"{v:.2f}x" for v in versus)
            if versus:
                against += (f" (median {statistics.median_low(versus):.2f}x; ahead in {sum(v > 1 for v in versus)} "
                            f"of {len(versus)})")
            lines.append(f"| {link} | {hosts} | {SYSTEM_NAMES[system] + label[len(system):]} | "
                         f"{', '.join(format(r['step_seconds'][label], '.2f') for r in mine)} | "
                         f"{', '.join(f'{v:.2f}x' for v in speedups)} | {statistics.median_low(speedups):.2f}x | "
                         f"{against or '–'} |")
    return "\n".join(lines)


def shaped_plot(rows: list[dict], path: Path, title: str) -> None:
    """Scaling efficiency against link rate, measured (markers) and the model's (lines), per host count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hvdbert.scaling import rate_bits_per_s

    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for label in dict.fromkeys(r["label"] for r in rows):
        for hosts in sorted({r["hosts"] for r in rows if r["label"] == label}):
            series = sorted((r for r in rows if r["label"] == label and r["hosts"] == hosts),
                            key=lambda r: rate_bits_per_s(r["link"]))
            rates = [rate_bits_per_s(r["link"]) / 1e6 for r in series]
            line, = axis.plot(rates, [r["scaling_efficiency"] for r in series], marker="o", linestyle="",
                              label=f"{label}, {hosts} hosts")
            if label == "hvdbert":
                axis.plot(rates, [r["predicted_scaling_efficiency"] for r in series], color=line.get_color(),
                          linestyle="--", label=f"model, {hosts} hosts")
    axis.set(xscale="log", xlabel="link rate, Mbit/s (tbf, both ends)", ylabel="scaling efficiency vs 1 host",
             ylim=(0, 1.05), title=title)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def machine_description() -> dict:
    return {
        "device": "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
