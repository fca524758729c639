"""Tokens to the reference loss: the reference recipe (configs/tiny.yaml: AdamW + cosine) against the fast recipe
(configs/tiny_fast.yaml: Muon + AdamW, warmup-stable-decay), through the real train.py, on CPU.

The report corpus is GCIDE (the Collaborative International Dictionary of English, ~40 MB of text), from Debian:

    mkdir -p data/corpora && cd data/corpora && apt-get download dict-gcide && dpkg -x dict-gcide_*.deb x
    # -> x/usr/share/dictd/gcide.dict.dz (+ gcide.index)

    python bench/bench_recipe.py prepare --corpus data/corpora/x/usr/share/dictd/gcide.dict.dz \\
        --out data/recipe-gcide                       # -> corpus.jsonl (plain-text documents) + shards/
    python bench/bench_recipe.py compare --data data/recipe-gcide --work runs/recipe-gcide \\
        --sizes 4x128 6x256 --seeds 0 1 --base_steps 200 --fast_steps 30 40 60 80 100 120 --base_lrs 3e-3 1.5e-3
    python bench/bench_recipe.py timing --data data/recipe-gcide --sizes 4x128 6x256
    python bench/bench_recipe.py horizons --data data/recipe-gcide --work runs/h-gcide --size 4x128 \\
        --horizons 100 400 800 --seeds 0 1 --extra_seed_lrs 1.5e-3 --max_ratio 2.9 \\
        --fast_steps 50 70 100 140 200 280 400 560                                  # the gain against length
    python bench/bench_recipe.py widths --data data/recipe-gcide --work runs/w-gcide --sizes 4x128 5x192 6x256
    python bench/bench_recipe.py ablate --data DIR --work DIR --size 4x128 --steps 80 \\
        --variant "muon_lr=0.04" --variant "schedule=cosine" ...     # tuning runs (on another corpus)

A second corpus, the Linux kernel's documentation (Debian's linux-doc-6.1, gzip'd reStructuredText):
`prepare --corpus data/corpora/x/usr/share/doc/linux-doc-6.1/Documentation --out data/recipe-linux`.

Cost of the `compare` above: 644 optimizer steps per size and seed (baseline 2 x 200; fast budgets chained: 30 +
22 + 36 + 44 + 52 + 60); one thread per run: a 4x128 step about 3.3 s, a 6x256 step about 7 s on the 2-vCPU dev
VM, so about 2.5 hours with two runs at a time. Run it where cores are free.

`prepare` turns a dictd dictionary (.dict / .dict.dz, with its .index beside it: one entry per index offset, the
dictionary markup stripped) or a folder of reStructuredText / text files (e.g. Debian's python3.11-doc
`_sources/*.rst.txt`) into plain-text documents of about 3,000 characters (consecutive entries or paragraphs),
shuffled with a fixed seed so the validation split (the first `--val_tokens` tokens) samples the whole corpus, and
writes token shards with data_prep.py. A .txt or .jsonl corpus is passed to data_prep.py as it is.

`compare` trains every (size, seed) with both recipes: the baseline for `--base_steps` at each `--base_lrs` (its
own LR tuning; the best mean final loss over seeds is the reference), the fast recipe at each `--fast_steps`
budget. A fast budget's run is its own schedule (the cool-down is the final decay_fraction of that budget); since a
wsd schedule is constant before its cool-down, the longer budgets resume from the shorter budget's checkpoint
taken before either cool-down starts (exact on CPU: same losses as a fresh run), which saves their shared steps.
Each run is a subprocess `python train.py --config <preset> ...` with its own folder under --work; a finished
run (final val_loss in its metrics.jsonl) is reused, so an interrupted comparison continues where it stopped.

The ratio per size and seed: tokens the baseline needs for its final validation loss (its budget) / tokens the
fast recipe needs for the same loss, found by linear interpolation of the fast recipe's final losses in
log(tokens) between the two budgets that bracket it (outside the budgets: reported as a bound, '>' or '<').
`timing` measures the wall-clock of one optimizer step of each optimizer in one process, interleaved.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_PRESET, FAST_PRESET = ROOT / "configs" / "tiny.yaml", ROOT / "configs" / "tiny_fast.yaml"
DOC_CHARS = 3000

# ---------------------------------------------------------------------------------------------------- corpora

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(text: str) -> int:
    """dictd's index numbers: base 64, most significant digit first."""
    value = 0
    for ch in text:
        value = value * 64 + _B64.index(ch)
    return value


def _clean_dict_entry(entry: str) -> str:
    """GCIDE / dictd markup to plain text: no source tags, pronunciations, cross-reference braces or hard wraps."""
    entry = re.sub(r"^\s*\[[^\]\n]*\]\s*$", "", entry, flags=re.M)  # [1913 Webster], [WordNet 1.5], [PJC] lines
    entry = re.sub(r"\s*\[(?:1913 Webster|Webster 1913 Suppl\.|WordNet[^\]]*|PJC|Century Dict\.)\]", "", entry)
    entry = re.sub(r"\\[^\\\n]{1,80}\\,?", "", entry)  # \Af*fect"\  pronunciations
    entry = re.sub(r"\[[=.^\"'~`]([a-zA-Z])\]", r"\1", entry)  # [=a] [.e]: letters with accents
    entry = re.sub(r"[{}]", "", entry)  # {Fact}: cross references
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", entry)]  # unwrap the indented lines
    return "\n".join(p for p in paragraphs if p)


def dict_documents(path: Path) -> list[str]:
    """Entries of a dictd dictionary (.dict or .dict.dz beside its .index), in file order, without the 00-database
    header entries; consecutive entries are joined into documents of about DOC_CHARS characters."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".dz" else path.read_bytes()
    index = Path(re.sub(r"\.dict(\.dz)?$", ".index", str(path)))
    spans = set()
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and not parts[0].startswith("00-database") and not parts[0].startswith("00database"):
            spans.add((_dictd_number(parts[1]), _dictd_number(parts[2])))
    entries = [_clean_dict_entry(raw[o : o + n].decode("utf-8", errors="replace")) for o, n in sorted(spans)]
    return _group([e for e in entries if e])


def _clean_rst(text: str) -> str:
    text = re.sub(r"^\s*\.\. .*$", "", text, flags=re.M)  # directives and comments
    text = re.sub(r"^\s+:[\w-]+:.*$", "", text, flags=re.M)  # directive options
    text = re.sub(r"^([=\-~^\"'`#*+])\1{3,}\s*$", "", text, flags=re.M)  # heading underlines
    text = re.sub(r":[\w:.-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", text)  # :func:`name` -> name
    text = re.sub(r"``([^`]*)``", r"\1", text).replace("`_", "").replace("`", "")
    return text


def text_tree_documents(folder: Path) -> list[str]:
    """Files of a folder (*.rst.txt, *.rst, *.txt, and *.rst.gz: Debian ships linux-doc's reStructuredText gzip'd) as
    paragraphs, joined into documents of about DOC_CHARS."""
    docs = []
    names = (".rst", ".txt", ".rst.gz")
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(names)):
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = _clean_rst(raw.decode("utf-8", errors="replace"))
        paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]
        docs += _group(paragraphs, sep="\n\n")
    return docs


def _group(parts: list[str], sep: str = "\n\n") -> list[str]:
    docs, current = [], []
    for part in parts:
        current.append(part)
        if sum(len(p) for p in current) >= DOC_CHARS:
            docs.append(sep.join(current))
            current = []
    return docs + ([sep.join(current)] if current else [])


def prepare(corpus: Path, out: Path, val_tokens: int, max_tokens: int | None) -> Path:
    """corpus -> out/corpus.jsonl (shuffled documents) -> out/shards (data_prep.py). Returns the shard folder."""
    shards = out / "shards"
    if (shards / "manifest.json").is_file():
        print(f"{shards}: already prepared")
        return shards
    out.mkdir(parents=True, exist_ok=True)
    if corpus.suffix in (".txt", ".jsonl") and corpus.is_file():
        dataset = corpus
    else:
        docs = text_tree_documents(corpus) if corpus.is_dir() else dict_documents(corpus)
        random.Random(0).shuffle(docs)
        dataset = out / "corpus.jsonl"
        with open(dataset, "w") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
        print(f"{len(docs):,} documents, {sum(map(len, docs)):,} characters -> {dataset}")
    cmd = [
        sys.executable,
        "data_prep.py",
        "--dataset",
        str(dataset),
        "--output_dir",
        str(shards),
        "--val_tokens",
        str(val_tokens),
    ] + (["--max_tokens", str(max_tokens)] if max_tokens else [])
    subprocess.run(cmd, cwd=ROOT, check=True)
    return shards


def shards_of(data: str) -> str:
    path = Path(data)
    return str(path / "shards") if (path / "shards" / "manifest.json").is_file() else str(path)


# ------------------------------------------------------------------------------------------------------- runs


def size_options(size: str) -> list[str]:
    """'4x128' -> layers x width; 64-wide heads from 256 up (GPT-2's), 32-wide below (configs/tiny.yaml's)."""
    layers, width = (int(v) for v in size.lower().split("x"))
    heads = width // 64 if width >= 256 else width // 32
    return ["--n_layer", str(layers), "--n_embd", str(width), "--n_head", str(heads)]


class _External:
    """A run that another bench process started (its pid file names a live process), polled like a Popen."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    @classmethod
    def of(cls, run_dir: Path) -> _External | None:
        try:
            pid = int((run_dir / "pid").read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return cls(pid)

    def poll(self) -> int | None:
        try:
            os.kill(self.pid, 0)
        except OSError:
            self.returncode = 0  # its own log and metrics say how it ended
        return self.returncode


def runner_args(args) -> tuple:
    """Runner's arguments from the options every training subcommand shares."""
    return Path(args.work), shards_of(args.data), args.val_tokens, args.threads, args.jobs


class Runner:
    """train.py subprocesses, `jobs` at a time, each with `threads` torch threads; finished runs are reused."""

    def __init__(self, work: Path, data: str, val_tokens: int, threads: int, jobs: int):
        self.work, self.data, self.val_tokens, self.threads, self.jobs = (work, data, val_tokens, threads, jobs)
        self.running: list[tuple[subprocess.Popen, str]] = []
        self.failed: list[str] = []

    @staticmethod
    def final(run_dir: Path) -> dict | None:
        """{"val_loss", "tokens", "step", "seconds"} of a finished run, else None."""
        cfg_path, metrics = run_dir / "config.yaml", run_dir / "metrics.jsonl"
        if not metrics.is_file() or not cfg_path.is_file():
            return None
        import yaml

        max_steps = yaml.safe_load(cfg_path.read_text())["optim"]["max_steps"]
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        evals = [r for r in rows if "val_loss" in r and r["step"] == max_steps]
        steps = [r for r in rows if "loss" in r]
        if not evals or not steps:
            return None
        step_ms = statistics.median(r["step_time_ms"] for r in steps)
        return {
            "val_loss": evals[-1]["val_loss"],
            "tokens": steps[-1]["tokens"],
            "step": max_steps,
            "train_loss": steps[-1]["loss"],
            "step_ms": step_ms,
        }

    def start(self, name: str, preset: Path, options: list[str], resume: Path | None = None) -> Path:
        run_dir = self.work / name
        if self.final(run_dir) is not None:
            return run_dir
        if (external := _External.of(run_dir)) is not None:  # another bench process is training it: wait for it
            self.running.append((external, name))
            return run_dir
        self.wait(self.jobs - 1)
        cmd = [
            sys.executable,
            "train.py",
            "--config",
            str(preset),
            "--data_dir",
            self.data,
            "--output_dir",
            str(run_dir),
            "--log_with",
            "none",
            "--hellaswag",
            "false",
            "--num_samples",
            "0",
            "--val_tokens",
            str(self.val_tokens),
            "--eval_batch_size",
            "8",
            "--cpu_threads",
            str(self.threads),
            *options,
        ]
        if resume is not None:
            cmd += ["--resume", str(resume)]
        elif (run_dir / "checkpoints").is_dir():
            cmd += ["--resume", "latest"]  # an interrupted run of ours continues
        run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(run_dir / "train.log", "a") as log:  # the child keeps its own handle
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        (run_dir / "pid").write_text(str(proc.pid))
        self.running.append((proc, name))
        print(f"[{time.strftime('%H:%M:%S')}] started {name}", flush=True)
        return run_dir

    def run_all(self, tasks: list[dict]) -> list[str]:
        """Start the tasks in order as slots free up; one with "after" waits for that run, then resumes from its
        checkpoint at "resume_step" (or starts fresh if there is none). Returns the names of the runs that failed."""
        pending = list(tasks)
        while pending or self.running:
            self.wait(self.jobs - 1)
            active = {n for _, n in self.running}
            ready = [
                t
                for t in pending
                if t.get("after") not in active and t.get("after") not in {p["name"] for p in pending}
            ]
            if ready and len(self.running) < self.jobs:
                task = ready[0]
                pending.remove(task)
                resume = None
                if "after" in task:
                    resume = self.work / task["after"] / "checkpoints" / f"step_{task['resume_step']:08d}"
                    resume = resume if (resume / "trainer_state.json").is_file() else None
                self.start(task["name"], task["preset"], task["options"], resume=resume)
            elif self.running:
                self.wait(len(self.running) - 1)
        return self.failed

    def wait(self, at_most: int = 0) -> None:
        while len(self.running) > at_most:
            for proc, name in list(self.running):
                if proc.poll() is not None:
                    self.running.remove((proc, name))
                    status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                    if proc.returncode != 0:
                        self.failed.append(name)
                    print(f"[{time.strftime('%H:%M:%S')}] {status} {name}", flush=True)
            time.sleep(1)


def decay_start(steps: int, decay_fraction: float) -> int:
    return steps - max(1, round(decay_fraction * steps))


def fast_budget_tasks(
    prefix: str, budgets: list[int], common: list[str], extra: list[str], decay_fraction: float, preset: Path
) -> list[dict]:
    """The fast recipe at each budget; each longer budget resumes from the previous one's checkpoint at its own
    cool-down start (before that step both schedules are identical: warmup then constant)."""
    tasks, previous = [], None
    for steps in sorted(budgets):
        opts = [
            *common,
            *extra,
            "--max_steps",
            str(steps),
            "--eval_every",
            "0",
            "--keep_last",
            "100",
            "--checkpoint_every",
            str(decay_start(steps, decay_fraction)),
        ]
        task = {"name": f"{prefix}-fast{steps}", "preset": preset, "options": opts, "steps": steps}
        if previous is not None:
            task["after"] = previous["name"]
            task["resume_step"] = decay_start(previous["steps"], decay_fraction)
        tasks.append(task)
        previous = task
    return tasks


def tokens_to_reach(target: float, points: list[tuple[int, float]]) -> tuple[float, str]:
    """Tokens at which the loss curve through `points` (tokens, loss; one per budget) reaches `target`: linear in
    log(tokens) between the bracketing budgets. Outside: the nearest budget and '>' (needs more) or '<' (fewer)."""
    points = sorted(points)
    if target < min(loss for _, loss in points):
        return float(points[-1][0]), ">"  # never reached
    if points[0][1] <= target:
        return float(points[0][0]), "<"  # already reached at the smallest budget
    for (t0, l0), (t1, l1) in zip(points, points[1:], strict=False):
        if l0 > target >= l1:
            frac = (l0 - target) / (l0 - l1)
            return math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0))), "="
    return float(points[-1][0]), ">"  # non-monotone and not reached at the largest


def base_options(common: list[str], lr: float, steps: int, eval_every: int) -> list[str]:
    """The reference recipe (tiny.yaml: AdamW, warmup 10, cosine to 10% at max_steps) at peak LR `lr`. It keeps its
    newest checkpoint (one per evaluation), so a killed comparison resumes it instead of starting it over."""
    schedule = ["--max_steps", str(steps), "--max_lr", str(lr), "--min_lr", str(lr / 10)]
    saves = ["--eval_every", str(eval_every), "--checkpoint_every", str(eval_every), "--keep_last", "1"]
    return [*common, *schedule, *saves]


def compare(args) -> list[str]:
    work = Path(args.work)
    runner = Runner(*runner_args(args))
    fast_extra, suffix = fast_overrides(args)
    decay_fraction = float(_preset_optim(args.fast_preset, fast_extra)["decay_fraction"])
    plan, tasks = {}, []  # plan: (size, seed) -> {"base": {lr: dir}, "fast": {steps: dir}}
    for size_i, size in enumerate(args.sizes):
        for seed_i, seed in enumerate(args.seeds):
            common = [*size_options(size), "--seed", str(seed)]
            tag = f"{size}-s{seed}"
            plan[(size, seed)] = {"base": {}, "fast": {}}
            for lr_i, lr in enumerate(args.base_lrs):
                name = f"{tag}-base-lr{lr:g}"
                plan[(size, seed)]["base"][lr] = work / name
                extra = int(lr_i > 0)  # the LR sweep's other values: after the next seed's first-LR runs
                prio = (seed_i + 1.5 * extra + int(extra and size_i > 0), size_i)
                tasks.append(
                    {
                        "name": name,
                        "preset": BASE_PRESET,
                        "options": base_options(common, lr, args.base_steps, args.base_eval_every),
                        "prio": prio,
                    }
                )
            budgets = fast_budget_tasks(
                tag + suffix, args.fast_steps, common, fast_extra, decay_fraction, args.fast_preset
            )
            for task in budgets:
                plan[(size, seed)]["fast"][task["steps"]] = work / task["name"]
                tasks.append({**task, "prio": (seed_i, size_i)})
    # seeds in turn, smaller sizes first
    failed = [] if args.report_only else runner.run_all(sorted(tasks, key=lambda t: t["prio"]))
    report(plan, args)
    return failed


def key_value(spec: str) -> tuple[str, str]:
    """argparse type of one override, "muon_lr=0.01" -> ("muon_lr", "0.01")."""
    key, sep, value = spec.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{spec!r} is not KEY=VALUE (muon_lr=0.01)")
    return key.strip(), value.strip()


def train_options(pairs: list[tuple[str, str]]) -> list[str]:
    """[("muon_lr", "0.01")] -> ["--muon_lr", "0.01"]: overrides as train.py options."""
    return [item for key, value in pairs for item in (f"--{key}", value)]


def fast_overrides(args) -> tuple[list[str], str]:
    """--fast_option's train.py options and run-name suffix. The suffix keeps runs with other settings apart from
    the preset's in one --work folder, where a finished run of the same name would be reused."""
    pairs = args.fast_option or []
    return train_options(pairs), "".join(f"-{key}{value}" for key, value in pairs)


def _preset_optim(preset: Path, extra: list[str]) -> dict:
    import yaml

    optim = dict(yaml.safe_load(preset.read_text())["optim"])
    for key, value in zip(extra[::2], extra[1::2], strict=False):
        if key.lstrip("-") in optim:
            optim[key.lstrip("-")] = yaml.safe_load(value)
    return optim


def report(plan: dict, args) -> None:
    rows, results = [], {}
    for (size, seed), runs in plan.items():
        base = {lr: r for lr, d in runs["base"].items() if (r := Runner.final(d)) is not None}
        fast = {steps: r for steps, d in runs["fast"].items() if (r := Runner.final(d)) is not None}
        if len(base) < len(runs["base"]) or len(fast) < len(runs["fast"]):
            print(f"{size} seed {seed}: some runs did not finish (see their train.log); using the finished ones")
        if not base or not fast:
            continue
        results[(size, seed)] = {"base": base, "fast": fast}
        for lr, r in base.items():
            rows.append((size, seed, f"adamw-cosine lr {lr:g}", r["tokens"], r["val_loss"], r["step_ms"]))
        for steps, r in sorted(fast.items()):
            rows.append((size, seed, f"muon-wsd {steps} steps", r["tokens"], r["val_loss"], r["step_ms"]))
    print("\n| size | seed | recipe | tokens | val loss | median step ms |\n|---|---|---|---|---|---|")
    for size, seed, recipe, tokens, loss, ms in rows:
        print(f"| {size} | {seed} | {recipe} | {tokens:,} | {loss:.4f} | {ms:.0f} |")

    summary = {}
    print("\n| size | seed | baseline LR | baseline tokens | baseline val loss | fast tokens to it | ratio |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        seeds = [s for s in args.seeds if (size, s) in results]
        if not seeds:
            continue
        lrs = set.intersection(*(set(results[(size, s)]["base"]) for s in seeds))
        best = min(lrs, key=lambda lr: statistics.mean(results[(size, s)]["base"][lr]["val_loss"] for s in seeds))
        ratios = []
        if not args.fast_steps:
            continue
        for s in seeds:
            b = results[(size, s)]["base"][best]
            points = [(r["tokens"], r["val_loss"]) for r in results[(size, s)]["fast"].values()]
            tokens, how = tokens_to_reach(b["val_loss"], points)
            ratio = b["tokens"] / tokens
            ratios.append((ratio, how))
            tok_bound, ratio_bound = {"=": ("", ""), ">": ("> ", "< "), "<": ("< ", "> ")}[how]
            print(
                f"| {size} | {s} | {best:g} | {b['tokens']:,} | {b['val_loss']:.4f} | {tok_bound}{tokens:,.0f} | "
                f"{ratio_bound}{ratio:.2f} |"
            )
        values = [r for r, _ in ratios]
        bounded = any(h != "=" for _, h in ratios)
        summary[size] = {
            "baseline_lr": best,
            "ratios": ratios,
            "mean": statistics.mean(values),
            "min": min(values),
            "max": max(values),
            "bounded": bounded,
        }
        note = " (bounds, not interpolated: widen --fast_steps)" if any(h != "=" for _, h in ratios) else ""
        print(
            f"| {size} | all | | | | | mean {statistics.mean(values):.2f} (min {min(values):.2f}, "
            f"max {max(values):.2f}, {len(values)} seeds){note} |"
        )
    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    suffix = fast_overrides(args)[1]
    data = {"rows": rows, "ratio": summary, "corpus": corpus_name(args.data), "fast_settings": fast_settings(args)}
    data["params"] = {size: size_params(size) for size in args.sizes}
    data["runs"] = compare_runs(plan, results, summary)
    (out / f"summary{suffix}.json").write_text(json.dumps(data, indent=2, default=str))
    plot(data, out / f"bench_recipe{suffix}.png")


def corpus_name(data: str) -> str:
    """The corpus of a `prepare --out` folder in words, for titles: recipe-gcide -> GCIDE."""
    name = Path(data.rstrip("/")).name
    name = Path(data.rstrip("/")).parent.name if name == "shards" else name
    name = name.removeprefix("recipe-")
    return {"gcide": "GCIDE", "linux": "Linux kernel docs", "pydocs": "Python docs"}.get(name, name)


def fast_settings(args) -> str:
    """The fast recipe's LRs and beta1 as run (the preset with --fast_option), for titles."""
    optim = _preset_optim(args.fast_preset, fast_overrides(args)[0])
    return f"muon_lr {optim['muon_lr']:g}, AdamW group {optim['max_lr']:g}, beta1 {optim['beta1']:g}"


def compare_runs(plan: dict, results: dict, summary: dict) -> list[dict]:
    """What `plot` draws of each finished run: its final loss; a baseline's evaluation curve; the training loss
    (10-step mean) of each size's reference baseline and longest fast budget."""
    runs = []
    for (size, seed), found in results.items():
        best = summary.get(size, {}).get("baseline_lr")
        for lr, final in found["base"].items():
            rows = [json.loads(line) for line in (plan[(size, seed)]["base"][lr] / "metrics.jsonl").open()]
            per_step = final["tokens"] / final["step"]
            evals = [[r["step"] * per_step, r["val_loss"]] for r in rows if "val_loss" in r]
            run = {"size": size, "seed": seed, "recipe": "base", "lr": lr, "tokens": final["tokens"]}
            run |= {"val_loss": final["val_loss"], "evals": evals}
            runs.append(run | ({"train": _smoothed_train(rows)} if lr == best else {}))
        longest = max(found["fast"])
        for steps, final in found["fast"].items():
            run = {"size": size, "seed": seed, "recipe": "fast", "steps": steps, "tokens": final["tokens"]}
            run["val_loss"] = final["val_loss"]
            if steps == longest:
                lines = (plan[(size, seed)]["fast"][steps] / "metrics.jsonl").open()
                run["train"] = _smoothed_train([json.loads(line) for line in lines])
            runs.append(run)
    return runs


def _smoothed_train(rows: list[dict]) -> list[list[float]]:
    rows = [r for r in rows if r.get("loss") is not None]
    return [[r["tokens"], statistics.mean(x["loss"] for x in rows[max(0, i - 9) : i + 1])] for i, r in enumerate(rows)]


HOLLOW = {"mfc": "white", "ms": 9, "zorder": 1}  # seeds after the first: larger rings beneath the first's marks


def _token_axis(ax) -> None:
    """A log token axis labelled 50K, 1M, 10B (not 5x10^4), at 1, 2 and 5 of each decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def tokens(value, _pos=None):
        for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
            if value >= scale:
                return f"{value / scale:.3g}{suffix}"
        return f"{value:.3g}"

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(tokens))
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot(data: dict, path: Path) -> None:
    """`compare`'s figure, one panel per size, from its summary JSON: final validation loss against tokens of each
    baseline LR (with its evaluation curve, when recorded) and of each fast budget; the reference loss each seed's
    fast recipe has to reach and where it reaches it; faint, the training loss (10-step mean) when recorded. Seeds
    after the first are drawn hollow."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sizes = list(dict.fromkeys(run["size"] for run in data["runs"]))
    fig = Figure(figsize=(6.8 * len(sizes), 5.2))
    FigureCanvasAgg(fig)
    for i, size in enumerate(sizes):
        ax, summary = fig.add_subplot(1, len(sizes), i + 1), data["ratio"].get(size, {})
        runs = [run for run in data["runs"] if run["size"] == size]
        seeds = sorted({run["seed"] for run in runs})
        for seed in seeds:
            hollow = HOLLOW if seed != seeds[0] else {}
            for run in sorted((r for r in runs if r["seed"] == seed and r["recipe"] == "base"), key=lambda r: r["lr"]):
                best = run["lr"] == summary.get("baseline_lr")
                style = {"color": "tab:blue", "alpha": 1.0 if best else 0.45, **hollow}
                label = f"AdamW + cosine, LR {run['lr']:g}{' (best)' if best else ''}, seed {seed}"
                if run.get("evals"):
                    ax.plot(*zip(*run["evals"], strict=True), "-" if best else ":", lw=1, **style)
                ax.plot(run["tokens"], run["val_loss"], "o", label=label, **style)
                if best:
                    target = "the best baseline's final loss: the target" if seed == seeds[0] else None
                    ax.axhline(run["val_loss"], color="tab:blue", lw=0.7, ls="--", alpha=0.6, label=target)
            fast = sorted((r for r in runs if r["seed"] == seed and r["recipe"] == "fast"), key=lambda r: r["tokens"])
            xs, ys = [r["tokens"] for r in fast], [r["val_loss"] for r in fast]
            ax.plot(xs, ys, "s--", color="tab:red", label=f"Muon + wsd, final loss per budget, seed {seed}", **hollow)
            for run in (r for r in runs if r["seed"] == seed and r.get("train")):
                color = "tab:blue" if run["recipe"] == "base" else "tab:red"
                ax.plot(*zip(*run["train"], strict=True), color=color, lw=0.7, alpha=0.3)
        for k, (seed, (ratio, how)) in enumerate(zip(seeds, summary.get("ratios", []), strict=False)):
            target = next(r for r in runs if r["seed"] == seed and r.get("lr") == summary["baseline_lr"])
            if how == "=":
                label = "where the fast recipe reaches it (interpolated)" if k == 0 else None
                ax.plot(target["tokens"] / ratio, target["val_loss"], "x", color="k", ms=8, mew=2, label=label)
        if any(run.get("train") for run in runs):
            ax.plot([], [], color="0.5", lw=0.7, alpha=0.5, label="training loss, 10-step mean (faint)")
        if not any(run.get("evals") for run in runs):
            ax.plot([], [], " ", label="(final losses only: the curves were not recorded)")
        ratios = ", ".join(f"{r:.2f}" for r, _ in summary.get("ratios", []))
        params = data.get("params", {}).get(size)
        title = f"{data['corpus']}, {size}" + (f" ({params / 1e6:.1f}M parameters)" if params else "")
        seed_list = ("seeds " if len(seeds) > 1 else "seed ") + ", ".join(map(str, seeds))
        ax.set_title(f"{title}\nthe fast recipe needs {ratios} times fewer tokens ({seed_list})", fontsize=10)
        ax.set(xlabel="training tokens", ylabel="validation loss")
        _token_axis(ax)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"AdamW + cosine (its LR swept)\nagainst Muon + wsd ({data['fast_settings']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


# --------------------------------------------------------------------------------------------------- horizons


def horizon_tasks(args, decay_fraction: float) -> tuple[dict, list[dict]]:
    """Every run of `horizons`: plan {seed: {"base": {(steps, lr): dir}, "fast": {steps: dir}}} and the tasks.

    Seed args.seeds[0] runs every horizon and budget; the other seeds only the longest horizon and the fast budgets
    that can bracket its target (budget x max_ratio >= the longest horizon). The fast chain comes first in the task
    list (it is sequential, the critical path), then the reference runs, longest first.
    """
    work, longest = Path(args.work), max(args.horizons)
    fast_extra, suffix = fast_overrides(args)
    plan, chains, bases = {}, [], []
    for i, seed in enumerate(args.seeds):
        common = [*size_options(args.size), "--seed", str(seed)]
        tag = f"{args.size}-s{seed}"
        horizons = sorted(args.horizons) if i == 0 else [longest]
        lrs = args.base_lrs if i == 0 else (args.extra_seed_lrs or args.base_lrs)
        budgets = [b for b in args.fast_steps if i == 0 or b * args.max_ratio >= longest]
        plan[seed] = {"base": {}, "fast": {}}
        for task in fast_budget_tasks(tag + suffix, budgets, common, fast_extra, decay_fraction, args.fast_preset):
            plan[seed]["fast"][task["steps"]] = work / task["name"]
            chains.append(task)
        for steps in horizons:
            for lr in lrs:
                name = f"{tag}-base{steps}-lr{lr:g}"
                plan[seed]["base"][(steps, lr)] = work / name
                opts = base_options(common, lr, steps, min(args.base_eval_every, steps))
                bases.append({"name": name, "preset": BASE_PRESET, "options": opts, "steps": steps})
    return plan, chains + sorted(bases, key=lambda t: -t["steps"])


def horizons(args) -> list[str]:
    """The gain against training length (see the module docstring): runs, then `horizon_report`."""
    fast_extra, _ = fast_overrides(args)
    decay_fraction = float(_preset_optim(args.fast_preset, fast_extra)["decay_fraction"])
    plan, tasks = horizon_tasks(args, decay_fraction)
    failed = [] if args.report_only else Runner(*runner_args(args)).run_all(tasks)
    horizon_report(plan, args)
    return failed


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def horizon_report(plan: dict, args) -> None:
    """Per horizon: the reference's LR sweep (best LR, whether interior), the fast recipe's tokens to the
    reference's final loss and the ratio; the fit of the ratio against log tokens; a JSON summary and a plot."""
    finals = {
        seed: {kind: {k: r for k, d in runs[kind].items() if (r := Runner.final(d))} for kind in runs}
        for seed, runs in plan.items()
    }
    print("\n| seed | run | tokens | val loss | median step ms |\n|---|---|---|---|---|")
    for seed, runs in finals.items():
        for (steps, lr), r in sorted(runs["base"].items()):
            print(
                f"| {seed} | AdamW cosine {steps} steps, lr {lr:g} | {r['tokens']:,} | {r['val_loss']:.4f} | "
                f"{r['step_ms']:.0f} |"
            )
        for steps, r in sorted(runs["fast"].items()):
            print(f"| {seed} | Muon + wsd {steps} steps | {r['tokens']:,} | {r['val_loss']:.4f} | {r['step_ms']:.0f} |")
    rows = []
    print(
        "\n| horizon (tokens) | reference LRs (val loss) | best LR | seed | reference loss | fast tokens to it | "
        "ratio |\n|---|---|---|---|---|---|---|"
    )
    for steps in sorted(args.horizons):
        lrs = sorted({lr for runs in finals.values() for (s, lr) in runs["base"] if s == steps})
        seeds = [s for s in finals if all((steps, lr) in finals[s]["base"] for lr in lrs)] if lrs else []
        if not seeds:
            continue
        mean = {lr: statistics.mean(finals[s]["base"][(steps, lr)]["val_loss"] for s in seeds) for lr in lrs}
        best = min(mean, key=mean.get)
        interior = lrs[0] < best < lrs[-1]
        sweep = ", ".join(f"{lr:g} ({mean[lr]:.4f})" for lr in lrs)
        for s in finals:
            b = finals[s]["base"].get((steps, best))
            points = [(r["tokens"], r["val_loss"]) for r in finals[s]["fast"].values()]
            if b is None or len(points) < 2:
                continue
            tokens, how = tokens_to_reach(b["val_loss"], points)
            ratio = b["tokens"] / tokens
            rows.append(
                {
                    "horizon_steps": steps,
                    "tokens": b["tokens"],
                    "seed": s,
                    "best_lr": best,
                    "lr_interior": interior,
                    "sweep": mean,
                    "reference_loss": b["val_loss"],
                    "fast_tokens": tokens,
                    "bound": how,
                    "ratio": ratio,
                }
            )
            bound = {"=": "", ">": "< ", "<": "> "}[how]
            edge = "" if interior else " (edge of the sweep)"
            print(
                f"| {b['tokens']:,} | {sweep} | {best:g}{edge} | {s} | {b['val_loss']:.4f} | {tokens:,.0f} | "
                f"{bound}{ratio:.2f} |"
            )
    for steps in sorted({r["horizon_steps"] for r in rows}):
        ratios = [r["ratio"] for r in rows if r["horizon_steps"] == steps and r["bound"] == "="]
        if len(ratios) >= 2:
            mean, low = statistics.mean(ratios), min(ratios)
            print(f"{steps} steps: ratio {mean:.2f}, the mean of {len(ratios)} seeds (lowest {low:.2f})")
    exact = [r for r in rows if r["bound"] == "="]
    fit = None
    if len({r["tokens"] for r in exact}) >= 2:
        a, b = fit_line([math.log(r["tokens"]) for r in exact], [r["ratio"] for r in exact])
        fit = {"intercept": a, "slope_per_e": b, "per_doubling": b * math.log(2)}
        print(
            f"\nfit: ratio = {a:.3f} + {b:.3f} ln(tokens): {b * math.log(2):+.3f} per doubling of the tokens "
            f"({len(exact)} points)"
        )
    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    name = "horizons" + fast_overrides(args)[1]
    specs = [f"{key}={value}" for key, value in args.fast_option or []]
    summary = {"rows": rows, "fit": fit, "size": args.size, "fast_option": specs, "corpus": corpus_name(args.data)}
    summary |= {"params": size_params(args.size), "fast_settings": fast_settings(args)}
    summary["finals"] = {
        "base": [
            [seed, st, lr, r["tokens"], r["val_loss"]]
            for seed, f in finals.items()
            for (st, lr), r in f["base"].items()
        ],
        "fast": [[seed, st, r["tokens"], r["val_loss"]] for seed, f in finals.items() for st, r in f["fast"].items()],
    }
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2, default=str))
    horizon_plot(summary, out / f"{name}.png")


def horizon_plot(summary: dict, path: Path) -> None:
    """`horizons`' figure from its JSON. Left: final validation loss against tokens, every reference run (the best
    LR per horizon joined) and every fast budget, per seed (seeds after the first hollow). Right: the token ratio per
    horizon (a bound where the fast budgets did not bracket the reference's loss), and the line fitted through the
    interpolated ratios, over the horizons it fits."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, fit, finals = summary["rows"], summary.get("fit"), summary["finals"]
    fig = Figure(figsize=(13, 5.2))
    FigureCanvasAgg(fig)
    ax, ax_ratio = fig.subplots(1, 2)
    seeds = sorted({seed for seed, *_ in finals["base"] + finals["fast"]})
    best = {(r["seed"], r["horizon_steps"], r["best_lr"]) for r in rows}
    others = [(t, v) for seed, st, lr, t, v in finals["base"] if (seed, st, lr) not in best]
    if others:
        ax.plot(*zip(*others, strict=True), "o", color="tab:blue", alpha=0.25, label="AdamW + cosine, other LRs swept")
    for seed in seeds:
        hollow = HOLLOW if seed != seeds[0] else {}
        points = sorted((r["tokens"], r["reference_loss"]) for r in rows if r["seed"] == seed)
        if points:
            label = f"AdamW + cosine, best LR per horizon, seed {seed}"
            ax.plot(*zip(*points, strict=True), "o-", color="tab:blue", label=label, **hollow)
        fast = sorted((t, v) for s, _, t, v in finals["fast"] if s == seed)
        if fast:
            label = f"Muon + wsd, final loss per budget, seed {seed}"
            ax.plot(*zip(*fast, strict=True), "s--", color="tab:red", label=label, **hollow)
    params = f" ({summary['params'] / 1e6:.1f}M parameters)" if summary.get("params") else ""
    ax.set(xlabel="training tokens", ylabel="final validation loss")
    ax.set_title(f"{summary['corpus']}, {summary['size']}{params}: final loss of each run", fontsize=10)
    _token_axis(ax)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    for seed in seeds:
        hollow = HOLLOW if seed != seeds[0] else {}
        exact = [(r["tokens"], r["ratio"]) for r in rows if r["seed"] == seed and r["bound"] == "="]
        if exact:
            ax_ratio.plot(*zip(*exact, strict=True), "o", color="tab:purple", label=f"seed {seed}", **hollow)
        bounds = [(r["tokens"], r["ratio"], r["bound"]) for r in rows if r["seed"] == seed and r["bound"] != "="]
        for k, (tokens, ratio, how) in enumerate(bounds):
            marker, words = ("^", "at least") if how == "<" else ("v", "at most")
            label = f"seed {seed}: {words} (no budget brackets the loss; not fitted)" if k == 0 else None
            ax_ratio.plot(tokens, ratio, marker, color="tab:purple", alpha=0.6, label=label, **hollow)
    for r in rows:
        ax_ratio.annotate(
            f"{r['ratio']:.2f}", (r["tokens"], r["ratio"]), (5, 3), textcoords="offset points", fontsize=7
        )
    fitted = sorted({r["tokens"] for r in rows if r["bound"] == "="})
    if fit and len(fitted) >= 2:  # drawn over the horizons it fits, not beyond
        ys = [fit["intercept"] + fit["slope_per_e"] * math.log(x) for x in fitted]
        n = sum(r["bound"] == "=" for r in rows)
        label = f"least-squares fit through the {n} interpolated ratios: {fit['per_doubling']:+.2f} per doubling"
        ax_ratio.plot(fitted, ys, "-", color="tab:purple", alpha=0.6, label=label)
    ax_ratio.set(xlabel="reference tokens (horizon)", ylabel="token ratio (reference / fast recipe)")
    ax_ratio.set_title(f"{summary['corpus']}, {summary['size']}: the fast recipe's gain per horizon", fontsize=10)
    _token_axis(ax_ratio)
    xs = [r["tokens"] for r in rows] or [1.0]
    ax_ratio.set_xlim(min(xs) / 1.5, max(xs) * 1.5)
    ax_ratio.grid(True, alpha=0.3)
    ax_ratio.legend(fontsize=7)
    lrs = ", ".join(f"{lr:g}" for lr in sorted({lr for _, _, lr, _, _ in finals["base"]}))
    fig.suptitle(
        f"AdamW + cosine, peak LR {'swept (' + lrs + ')' if ',' in lrs else lrs}, against Muon + wsd "
        f"({summary['fast_settings']}); 2,048 tokens per step",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def replot(paths: list[Path]) -> None:
    """Draw again the figures of recorded results (a `compare` summary or a `horizons` JSON), beside each JSON."""
    for path in paths:
        data = json.loads(path.read_text())
        if "finals" in data:
            horizon_plot(data, path.with_suffix(".png"))
        elif "runs" in data:
            plot(data, path.with_suffix(".png"))
        else:
            print(f"{path}: no figure for these results")


# ----------------------------------------------------------------------------------------------------- widths


def size_params(size: str) -> int:
    """Parameters of the tiny presets' GPT-2 at `size` (LAYERSxWIDTH; 50304-row vocabulary, 128 positions)."""
    sys.path.insert(0, str(ROOT))
    from gpt2_repro.base.config import load_config, parameter_count

    opts = size_options(size)
    cfg = load_config(BASE_PRESET, dict(zip((o.lstrip("-") for o in opts[::2]), opts[1::2], strict=True)))
    return parameter_count(cfg.model)


def width_tasks(args) -> tuple[dict, list[dict]]:
    """plan {(size, group, lr): dir} and the tasks: the fast recipe at each size for tokens_per_param x parameters
    tokens, its Muon LR swept (muon_lrs), and at adamw_sizes its AdamW group's peak LR swept (adamw_lrs)."""
    work, plan, tasks = Path(args.work), {}, []
    preset = _preset_optim(args.fast_preset, [])
    for size in args.sizes:
        steps = max(20, round(args.tokens_per_param * size_params(size) / 2048))
        common = [*size_options(size), "--seed", str(args.seeds[0]), "--max_steps", str(steps)]
        common += ["--eval_every", "0", "--checkpoint_every", "0"]
        sweeps = [("muon", lr, ["--muon_lr", str(lr)]) for lr in args.muon_lrs]
        if size in args.adamw_sizes:
            sweeps += [("adamw", lr, ["--max_lr", str(lr), "--min_lr", str(lr / 10)]) for lr in args.adamw_lrs]
        for group, lr, opts in sweeps:
            if group == "adamw" and lr == preset["max_lr"] and (size, "muon", preset["muon_lr"]) in plan:
                plan[(size, group, lr)] = plan[(size, "muon", preset["muon_lr"])]  # both LRs the preset's: one run
                continue
            name = f"{size}-{steps}steps-{group}{lr:g}"
            plan[(size, group, lr)] = work / name
            tasks.append({"name": name, "preset": args.fast_preset, "options": [*common, *opts], "steps": steps})
    return plan, sorted(tasks, key=lambda t: -t["steps"])  # the longest first: two runs at a time end together


def log_vertex(sweep: dict[float, float]) -> float | None:
    """The LR at the minimum of a parabola in log(LR) through the best swept LR and its two neighbours (equal
    log spacing assumed, as a sweep by factors of 2 has); None when the best is at an edge of the sweep."""
    lrs = sorted(sweep)
    i = min(range(len(lrs)), key=lambda k: sweep[lrs[k]])
    if i in (0, len(lrs) - 1):
        return None
    left, mid, right = (sweep[lrs[k]] for k in (i - 1, i, i + 1))
    offset = (left - right) / (2 * (left + right - 2 * mid))  # in steps of the sweep's factor, from the best
    return math.exp(math.log(lrs[i]) + offset * (math.log(lrs[i + 1]) - math.log(lrs[i])))


def widths(args) -> list[str]:
    """The fast recipe's LRs across widths at the same tokens per parameter: the best Muon LR (and AdamW-group LR)
    at each width, whether it moves with width, and the rule fitted to it (LR against width, log-log)."""
    plan, tasks = width_tasks(args)
    failed = [] if args.report_only else Runner(*runner_args(args)).run_all(tasks)
    finals = {key: r for key, d in plan.items() if (r := Runner.final(d))}
    print("\n| size | params | tokens | group | peak LR | val loss |\n|---|---|---|---|---|---|")
    best = {}
    for (size, group, lr), r in sorted(finals.items()):
        print(f"| {size} | {size_params(size) / 1e6:.1f}M | {r['tokens']:,} | {group} | {lr:g} | {r['val_loss']:.4f} |")
    for size in args.sizes:
        for group in ("muon", "adamw"):
            swept = {lr: r["val_loss"] for (sz, g, lr), r in finals.items() if sz == size and g == group}
            if len(swept) >= 2:
                lr = min(swept, key=swept.get)
                vertex = log_vertex(swept)
                best[(size, group)] = {"lr": lr, "interior": vertex is not None, "vertex": vertex, "sweep": swept}
    print("\n| size | group | best peak LR | parabola's minimum | losses by LR |\n|---|---|---|---|---|")
    for (size, group), b in best.items():
        losses = ", ".join(f"{lr:g}: {v:.4f}" for lr, v in sorted(b["sweep"].items()))
        vertex = f"{b['vertex']:.2g}" if b["vertex"] else "- (best at the edge)"
        print(f"| {size} | {group} | {b['lr']:g} | {vertex} | {losses} |")
    fits = {}
    for group in ("muon", "adamw"):
        points = [(int(size.split("x")[1]), b["vertex"] or b["lr"]) for (size, g), b in best.items() if g == group]
        if len({w for w, _ in points}) >= 2:
            a, slope = fit_line([math.log(w) for w, _ in points], [math.log(lr) for _, lr in points])
            fits[group] = {"slope": slope, "lr_at_768": math.exp(a + slope * math.log(768))}
            print(f"{group}: best LR ~ width^{slope:.2f}; at width 768: {fits[group]['lr_at_768']:.3g}")
    out = Path(args.work)
    summary = {
        "rows": [[*k, v["tokens"], v["val_loss"]] for k, v in finals.items()],
        "best": {f"{k[0]} {k[1]}": v for k, v in best.items()},
        "fits": fits,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "widths.json").write_text(json.dumps(summary, indent=2, default=str))
    return failed


# --------------------------------------------------------------------------------------------------- ablation


def ablate(args) -> list[str]:
    """The fast recipe (or, with 'base:' first, the baseline preset) at one budget with option overrides each:
    --variant "muon_lr=0.04,schedule=cosine". Prints final val loss per variant and seed."""
    runs, tasks = [], []
    for variant in args.variant:
        preset, spec = (BASE_PRESET, variant[5:]) if variant.startswith("base:") else (args.fast_preset, variant)
        options = train_options([key_value(item) for item in filter(None, spec.split(","))])
        steps = next((v for k, v in zip(options[::2], options[1::2], strict=False) if k == "--max_steps"), None)
        for seed in args.seeds:
            name = re.sub(r"[^\w.=,:-]", "_", f"{args.size}-s{seed}-{variant or 'fast'}")
            opts = [*size_options(args.size), "--seed", str(seed), "--eval_every", "0", "--checkpoint_every", "0"]
            opts += [] if steps else ["--max_steps", str(args.steps)]
            runs.append((variant, seed, Path(args.work) / name))
            tasks.append({"name": name, "preset": preset, "options": [*opts, *options]})
    failed = Runner(*runner_args(args)).run_all(tasks)
    print("\n| variant | seed | tokens | val loss |\n|---|---|---|---|")
    for variant, seed, run_dir in runs:
        r = Runner.final(run_dir)
        tokens, loss = (f"{r['tokens']:,}", f"{r['val_loss']:.4f}") if r else ("-", "FAILED")
        print(f"| {variant or '(preset)'} | {seed} | {tokens} | {loss} |")
    return failed


# ----------------------------------------------------------------------------------------------------- timing


def timing(args) -> None:
    """Wall-clock of one optimizer step (train_step: forward, backward, clip, optimizer) per optimizer, the
    two models (same init) stepping in alternation in this process, so machine load hits both alike."""
    import torch

    sys.path.insert(0, str(ROOT))
    from gpt2_repro.base.config import parse_args
    from gpt2_repro.base.run_folder import RunFolder
    from gpt2_repro.data.shard_loader import TokenShardLoader
    from gpt2_repro.training.accelerator import make_accelerator
    from gpt2_repro.training.optim import build_optimizers, set_lrs
    from gpt2_repro.training.step import train_step
    from modeling_gpt2_repro import GPT2ReproForCausalLM

    torch.set_num_threads(args.threads)
    data = shards_of(args.data)
    for size in args.sizes:
        setups = {}
        for name, preset in (("adamw", BASE_PRESET), ("muon", args.fast_preset)):
            cfg = parse_args(
                [
                    "--config",
                    str(preset),
                    "--data_dir",
                    data,
                    *size_options(size),
                    "--log_with",
                    "none",
                    "--cpu_threads",
                    str(args.threads),
                ]
            )
            accelerator = make_accelerator(cfg, RunFolder(Path(args.work) / "timing"))
            torch.set_num_threads(args.threads)
            torch.manual_seed(0)
            raw = GPT2ReproForCausalLM(cfg.model_config())
            model, *opts = accelerator.prepare(raw, *build_optimizers(raw, cfg, accelerator.device))
            d = cfg.data
            loader = TokenShardLoader(d.data_dir, split="train", batch_size=d.micro_batch_size, seq_len=d.seq_len)
            setups[name] = {
                "cfg": cfg,
                "acc": accelerator,
                "model": model,
                "opts": opts,
                "loader": loader,
                "step": [],
                "update": [],
            }
        for step in range(args.warmup + args.steps):
            for st in setups.values():
                set_lrs(st["opts"], 20, st["cfg"].optim)
                t0 = time.perf_counter()
                train_step(st["acc"], st["model"], st["opts"], st["loader"], st["cfg"].optim.grad_clip)
                if step >= args.warmup:
                    st["step"].append(time.perf_counter() - t0)
        for st in setups.values():  # the optimizer update alone: one set of gradients left in place
            x, y = st["loader"].next_batch()
            st["model"](input_ids=x, shift_labels=y, return_logits=False).loss.backward()
        for _ in range(args.steps):
            for st in setups.values():
                t0 = time.perf_counter()
                for opt in st["opts"]:
                    opt.step()
                st["update"].append(time.perf_counter() - t0)
        for name, st in setups.items():
            times, updates = st["step"], st["update"]
            print(
                f"{size} {name:5s}: train step median {1000 * statistics.median(times):7.1f} ms "
                f"(p25 {1000 * _q(times, 0.25):.1f}, p75 {1000 * _q(times, 0.75):.1f}, n={len(times)}); "
                f"optimizer.step() alone median {1000 * statistics.median(updates):.2f} ms",
                flush=True,
            )


def _q(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


# ------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="corpus -> plain-text documents -> token shards")
    p.add_argument("--corpus", required=True, help="dictd .dict(.dz), a folder of .rst/.txt files, a .txt or .jsonl")
    p.add_argument("--out", required=True)
    p.add_argument("--val_tokens", type=int, default=131072)
    p.add_argument("--max_tokens", type=int, default=None)
    for name in ("compare", "horizons", "widths", "ablate", "timing"):
        q = sub.add_parser(name)
        q.add_argument("--data", required=True, help="a prepare --out folder, or a shard folder")
        q.add_argument("--work", default="/tmp/bench_recipe", help="run folders (reused when finished)")
        q.add_argument("--val_tokens", type=int, default=65536, help="validation tokens per evaluation")
        q.add_argument("--threads", type=int, default=1, help="torch threads per run")
        q.add_argument("--jobs", type=int, default=2, help="runs at a time")
        q.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
        q.add_argument(
            "--fast_preset",
            type=Path,
            default=FAST_PRESET,
            help="the fast recipe's preset (runs of another preset: another --work, since finished runs are reused "
            "by name); bench/tiny_fast_before_tuning.yaml is the one the earlier tables measured",
        )
    c = sub.choices["compare"]
    c.add_argument("--sizes", nargs="+", default=["4x128", "6x256"], help="LAYERSxWIDTH")
    c.add_argument("--base_steps", type=int, default=200)
    c.add_argument("--base_lrs", type=float, nargs="+", default=[3e-3], help="baseline peak LRs (min_lr = 10%%)")
    c.add_argument("--base_eval_every", type=int, default=100)
    c.add_argument("--fast_steps", type=int, nargs="*", default=[60, 80, 100], help="none: baselines only")
    c.add_argument("--report_only", action="store_true", help="tables and plot of the finished runs; train none")
    c.add_argument("--fast_option", nargs="*", type=key_value, help="fast recipe overrides: KEY=VALUE (muon_lr=0.01)")
    h = sub.choices["horizons"]
    h.add_argument("--size", default="4x128", help="LAYERSxWIDTH")
    h.add_argument("--horizons", type=int, nargs="+", default=[200, 800, 1600], help="reference max_steps")
    h.add_argument("--base_lrs", type=float, nargs="+", default=[7.5e-4, 1.5e-3, 3e-3])
    h.add_argument("--extra_seed_lrs", type=float, nargs="*", help="reference LRs of the seeds after the first")
    h.add_argument("--base_eval_every", type=int, default=200)
    h.add_argument("--fast_steps", type=int, nargs="+", default=[50, 70, 100, 140, 200, 280, 400, 560, 800, 1120])
    h.add_argument("--max_ratio", type=float, default=4.0, help="later seeds: budgets >= longest / max_ratio")
    h.add_argument("--fast_option", nargs="*", type=key_value, help="fast recipe overrides: KEY=VALUE (muon_lr=0.01)")
    h.add_argument("--report_only", action="store_true")
    w = sub.choices["widths"]
    w.add_argument("--sizes", nargs="+", default=["4x128", "5x192", "6x256"], help="LAYERSxWIDTH")
    w.add_argument("--tokens_per_param", type=float, default=0.04, help="the same at every size")
    w.add_argument("--muon_lrs", type=float, nargs="+", default=[0.0025, 0.005, 0.01, 0.02])
    w.add_argument("--adamw_sizes", nargs="*", default=["4x128", "5x192"], help="sizes whose AdamW LR is swept too")
    w.add_argument("--adamw_lrs", type=float, nargs="+", default=[1.5e-3, 3e-3, 6e-3])
    w.add_argument("--report_only", action="store_true")
    a = sub.choices["ablate"]
    a.add_argument("--size", default="4x128")
    a.add_argument("--steps", type=int, default=80)
    a.add_argument(
        "--variant",
        action="append",
        default=[],
        help="'key=value,...' over --fast_preset; 'base:key=value,...' over tiny.yaml; '' = the preset",
    )
    t = sub.choices["timing"]
    t.add_argument("--sizes", nargs="+", default=["4x128", "6x256"])
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--warmup", type=int, default=3)
    r = sub.add_parser("replot", help="the figures of recorded results, from their JSON")
    r.add_argument("json", nargs="+", type=Path, help="bench/results/*.json")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(Path(args.corpus), Path(args.out), args.val_tokens, args.max_tokens)
    elif args.command == "replot":
        replot(args.json)
    else:
        commands = {"compare": compare, "horizons": horizons, "widths": widths, "ablate": ablate, "timing": timing}
        failed = commands[args.command](args)
        if failed:  # the tables above leave these runs out: say so, and exit non-zero
            sys.exit(f"error: {len(failed)} run(s) failed ({', '.join(failed)}); each one's train.log says why")


if __name__ == "__main__":
    main()
