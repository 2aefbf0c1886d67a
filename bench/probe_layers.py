"""What an encoder's layers hold before any fine-tuning: a linear probe per layer, pretrained against
random encoders of the same shape.

    python -m bench.probe_layers --model RUN_DIR|HF_DIR [--random-seeds 1,2] [--train-per-class 16]

The builtin task of hvdbert.finetune (the same split, and for --train-per-class the same draw) is
encoded once by the frozen model: for each layer (the embeddings, then each transformer layer) the
mean of its output over the non-padding tokens, and the last layer's first token ([CLS]). A
multinomial logistic regression (L2 1e-2, standardised features, L-BFGS) is fitted on the training
part and scored on the dev part, for every training example and for --train-per-class of each. The
same is done for random initialisations of the same configuration (--random-seeds). Examples are cut
at the length hvdbert.finetune would use. A few CPU-seconds for the tiny shapes: it says whether
the pretrained encoder's features separate the task better than a random encoder's at all, which
fine-tuning (bench.probe_table) cannot separate from how each initialisation trains.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from hvdbert.errors import ArgumentParser, UsageError, cli_entry


def parse_args(argv):
    parser = ArgumentParser(prog="python -m bench.probe_layers", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="hvdbert run directory or transformers model directory")
    parser.add_argument("--random-seeds", default="1,2", help="comma-separated seeds of the random encoders")
    parser.add_argument("--train-per-class", type=int, default=16, help="the few-shot fit's examples per class")
    args = parser.parse_args(argv)
    try:
        args.random_seeds = [int(s) for s in args.random_seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--random-seeds {args.random_seeds!r}: expected comma-separated integers, e.g. 1,2") from None
    if args.train_per_class < 1:
        raise UsageError(f"--train-per-class {args.train_per_class}: expected 1 or more examples per class")
    return args


def features(model, tokenizer, texts: list[str], max_length: int):
    """Per example: each layer's mean over the non-padding tokens, then the last layer's first token."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            batch = tokenizer(texts[i:i + 64], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            states = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      output_hidden_states=True).hidden_states
            weights = batch["attention_mask"].unsqueeze(-1).float()
            pooled = [(h * weights).sum(1) / weights.sum(1) for h in states] + [states[-1][:, 0]]
            out.append(torch.stack(pooled))
    return torch.cat(out, 1)  # (layers + 2, examples, hidden)


def linear_probe(train_x, train_y, dev_x, dev_y, classes: int) -> float:
    import torch

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, dev_x = (train_x - mean) / std, (dev_x - mean) / std
    weight = torch.zeros(train_x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(train_x @ weight + bias, train_y) + 1e-2 * (weight ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(((dev_x @ weight + bias).argmax(1) == dev_y).float().mean())


@cli_entry("bench.probe_layers")
def main(argv=None) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM

    from hvdbert.data.tokenizer import load_any_tokenizer
    from hvdbert.finetune import builtin_examples, few_per_class, resolve_model, split_by_document

    args = parse_args(argv)
    args.max_length = None  # finetune's default length, cut at the pretraining length
    examples = builtin_examples()
    labels = sorted({e.label for e in examples})
    train, dev = split_by_document(examples, 0.2, 0)
    parts = {"all": train, f"{args.train_per_class}/class": few_per_class(train, args.train_per_class, 0)}
    with tempfile.TemporaryDirectory() as work:
        model_dir, max_length = resolve_model(args, Path(work))
        tokenizer = load_any_tokenizer(model_dir, "")
        config = AutoConfig.from_pretrained(str(model_dir))
        models = [("pretrained", AutoModelForMaskedLM.from_pretrained(str(model_dir)))]
        for seed in args.random_seeds:
            torch.manual_seed(seed)
            models.append((f"random seed {seed}", AutoModelForMaskedLM.from_config(config)))
    print(f"linear probe on frozen features, {len(labels)} classes, {len(dev)} dev examples, {max_length} tokens; "
          "columns: mean of the embeddings, of each layer, then the last layer's first token", flush=True)
    dev_y = torch.tensor([labels.index(e.label) for e in dev])
    for name, model in models:
        model.eval()
        dev_x = features(model, tokenizer, [e.text for e in dev], max_length)
        for part, examples_ in parts.items():
            train_x = features(model, tokenizer, [e.text for e in examples_], max_length)
            train_y = torch.tensor([labels.index(e.label) for e in examples_])
            scores = [linear_probe(train_x[k], train_y, dev_x[k], dev_y, len(labels)) for k in range(train_x.shape[0])]
            print(f"{name:>16} {part:>9}: " + " ".join(f"{s:.3f}" for s in scores), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
