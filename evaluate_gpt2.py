"""Did my run reproduce GPT-2? Validation loss and HellaSwag for any causal LM, side by side with OpenAI's GPT-2.

    python evaluate_gpt2.py --model runs/gpt2-124m/export --data_dir data/fineweb-edu-10BT --compare gpt2
    python evaluate_gpt2.py --model runs/x/export --dataset HuggingFaceFW/fineweb-edu   # a stream's first tokens
    accelerate launch evaluate_gpt2.py --model gpt2 --hellaswag_file hellaswag_val.jsonl   # several processes

The measurements (gpt2_repro/evaluation.py, the same kernels the training loop calls): validation loss over a
fixed token budget of data_prep.py's val shards or of a stream's first tokens, and HellaSwag scored as
build-nanogpt / llm.c do. The report (gpt2_repro/reports.py): a table beside OpenAI's published figures, a JSON
file, the model card's evaluation section, and a plot of the training run's curves.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gpt2_repro.base import cli
from gpt2_repro.base.cli import opt
from gpt2_repro.base.errors import ConfigError
from gpt2_repro.base.published import BUILD_NANOGPT_VAL_TOKENS, GPT2_124M, GPT3_124M, HELLASWAG_VAL_SIZE

logger = logging.getLogger("evaluate_gpt2")


@dataclass
class EvaluateArgs:
    """Command line of evaluate_gpt2.py (each field is an option)."""

    model: str = opt(help="checkpoint folder or Hub id (e.g. gpt2) of a causal LM")
    data_dir: str | None = opt(
        None,
        "folder (or glob) of data_prep.py shards; unset: the training run's data when --model is one of its "
        "checkpoints or exports (else no validation loss, unless --dataset)",
    )
    dataset: str | None = opt(
        None, "or validate on the first tokens of this text stream: Hub id or local parquet/jsonl/txt"
    )
    dataset_name: str | None = opt(None, "--dataset's config (sample-10BT for FineWeb-Edu)")
    dataset_split: str = opt("train", "--dataset's split")
    text_column: str = opt("text", "--dataset's column holding the documents")
    val_tokens: int | None = opt(
        None,
        "validation token budget; auto: the training run's, on its data (when --model is one of its checkpoints "
        "or exports), else build-nanogpt's 10,485,760",
        auto=True,
    )
    seq_len: int | None = opt(
        None,
        "tokens per validation sequence; auto: the training run's (as val_tokens), else min(1024, the model's context)",
        auto=True,
    )
    eval_batch_size: int = opt(8, "validation sequences per forward pass", aliases=("val_batch_size",))
    hellaswag_file: str | None = opt(None, "local hellaswag_val.jsonl; unset: download once and cache")
    hellaswag_limit: int | None = opt(None, "score only the first N HellaSwag examples", aliases=("limit",))
    batch_size: int = opt(32, "HellaSwag examples per forward pass (4 rows each)")
    compare: str | None = opt(None, "also evaluate this model (e.g. gpt2) and print a side-by-side table")
    output: str | None = opt(None, "results JSON; unset: <model folder>/eval_results.json (./ for Hub ids)")
    log_dir: str | None = opt(None, "training run folder (or its metrics.jsonl) to plot; unset: found near the model")
    plot: str | None = opt(None, "PNG of the training curves; unset: the results JSON path with .png")
    model_card: bool = opt(True, "write the results into README.md of a local model folder")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto: a GPU per process when there is one")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = opt("float32", "weights' dtype (auto: checkpoint's)")
    trust_remote_code: bool = opt(False, "load the model's own code from its folder/repo (auto_map)")
    vocab_file: str | None = opt(None, "GPT-2 vocabulary r50k_base.tiktoken for offline machines")
    compile: bool = opt(False, "torch.compile the model's body (dynamic shapes); worth it on a GPU")

    def validate(self) -> None:
        if self.data_dir is not None and self.dataset is not None:
            raise ConfigError("Validate on shards (--data_dir) or on a stream (--dataset), not both.")
        for name in ("val_tokens", "eval_batch_size", "batch_size", "seq_len", "hellaswag_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {value}.")


def parse_args(argv: list[str] | None = None) -> EvaluateArgs:
    return cli.parse(EvaluateArgs, argv, __doc__.split("\n\n")[0])


def evaluate_model(
    model, encoding, args: EvaluateArgs, examples: list[dict] | None, accelerator=None, val_data=None, val_tokens=None
) -> dict:
    """Both measurements for one loaded model, each when its data is there (None otherwise).

    val_data: what `validation_loss` reads (default: --data_dir); val_tokens: how many of its tokens to score
    (default --val_tokens; fewer when the split is smaller)."""
    from gpt2_repro.evaluation.scoring import score_hellaswag, validation_loss

    out = {"val_loss": None, "val_tokens": None, "seq_len": None, "hellaswag_acc": None, "hellaswag_acc_norm": None}
    out["hellaswag_examples"] = 0
    val_data = args.data_dir if val_data is None else val_data
    if val_data is not None:
        start = time.perf_counter()
        budget = args.val_tokens if val_tokens is None else val_tokens
        out["val_loss"] = validation_loss(model, val_data, budget, args.eval_batch_size, args.seq_len, accelerator)
        scored = budget // args.seq_len * args.seq_len  # whole windows only (loader.iter_val_batches)
        out.update(val_tokens=scored, seq_len=args.seq_len, val_seconds=time.perf_counter() - start)
        if scored < args.val_tokens // args.seq_len * args.seq_len:
            out["val_tokens_asked"] = args.val_tokens  # the split was smaller: all of it was scored
    if examples:
        start = time.perf_counter()
        r = score_hellaswag(model, encoding, examples, args.batch_size, accelerator, progress=True)
        out.update(hellaswag_acc=r["acc"], hellaswag_acc_norm=r["acc_norm"], hellaswag_examples=r["n"])
        out["hellaswag_seconds"] = time.perf_counter() - start
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)  # imports no torch: --help and an option error answer at once
    output = Path(
        args.output or (Path(args.model) / "eval_results.json" if Path(args.model).is_dir() else "eval_results.json")
    )
    run_eval, run_lines = run_defaults(args)  # before preflight, which checks the data they may name
    named_examples = preflight(args, output)
    import torch
    from accelerate import Accelerator

    from gpt2_repro.base.errors import EvaluationInputError
    from gpt2_repro.data.tokenizer import get_gpt2_encoding
    from gpt2_repro.evaluation.models import check_vocab, compile_body, context_length, load_model
    from gpt2_repro.evaluation.reports import comparison_notes, public_name

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible here. Use --device cpu (or auto).")
    accelerator = Accelerator(cpu=args.device == "cpu")
    logging.basicConfig(format="%(message)s")  # the libraries' own notices stay at their default: warnings
    for name in ("evaluate_gpt2", "gpt2_repro"):  # ours: progress on the main process, errors only elsewhere
        logging.getLogger(name).setLevel(logging.INFO if accelerator.is_main_process else logging.ERROR)
    for line in run_lines:
        logger.info(line)
    encoding = get_gpt2_encoding(args.vocab_file)
    examples = named_examples or _hellaswag_examples(args, accelerator)
    model = load_model(args.model, args.dtype, args.trust_remote_code).to(accelerator.device)
    check_vocab(model, encoding.n_vocab)
    if args.compile:
        compile_body(model)
    if args.data_dir is None and args.dataset is None:
        logger.warning(
            "No --data_dir: validation loss skipped (pass the folder of data_prep.py shards, or a "
            "--dataset to validate on its first tokens)."
        )
    elif args.seq_len is None:
        args.seq_len = min(1024, context_length(model) or 1024)
    elif args.seq_len > (context_length(model) or args.seq_len):
        raise EvaluationInputError(
            f"seq_len={args.seq_len} is longer than the model's context ({context_length(model)}): pass "
            f"seq_len<={context_length(model)}."
        )
    val_data, val_tokens = _validation_data(args, encoding)

    results = {"model": public_name(args.model), "processes": accelerator.num_processes}
    results.update(evaluate_model(model, encoding, args, examples, accelerator, val_data, val_tokens), compare=None)
    results["val_data"] = _val_data_name(args) if results["val_loss"] is not None else None
    if run_eval is not None:  # the trainer's own figure, and whether this one is over the same tokens
        same = run_eval["same_data"] and (results["val_tokens"], results["seq_len"]) == (
            run_eval["val_tokens"],
            run_eval["seq_len"],
        )
        results["run_eval"] = {**run_eval, "same_tokens": same}
    if args.compare:
        try:
            other = load_model(args.compare, args.dtype, args.trust_remote_code).to(accelerator.device)
            other = compile_body(other) if args.compile else other
        except (OSError, ValueError) as e:
            logger.warning("Could not load %s to compare (%s); using its published figures.", args.compare, e)
            # The results are shared (the JSON, the model card): why in general terms, not this machine's message.
            results["compare"] = {"model": public_name(args.compare), "evaluated": False, "reason": load_failure(e)}
            results["compare"].update({**GPT2_124M, "hellaswag_examples": HELLASWAG_VAL_SIZE})
        else:
            del model  # one model in memory at a time
            results["compare"] = {"model": public_name(args.compare), "evaluated": True}
            results["compare"].update(
                evaluate_model(other, encoding, args, examples, accelerator, val_data, val_tokens)
            )
    results.update(
        published={"gpt2_124m": GPT2_124M, "gpt3_124m": GPT3_124M},
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        notes=comparison_notes(results),
    )
    if accelerator.is_main_process:
        _report(args, results, output)
    accelerator.wait_for_everyone()
    return results


def run_defaults(args: EvaluateArgs) -> tuple[dict | None, list[str]]:
    """Fill the unset --data_dir (or --dataset), --val_tokens and --seq_len from the training run that --model comes
    from (one of its checkpoints or exports: `training_run_of`), so that by default the tokens the run evaluated
    are scored again; elsewhere --val_tokens is build-nanogpt's budget. Imports no torch.

    Returns (the run's own evaluation {"val_loss", "val_step", "val_tokens" (whole windows), "seq_len",
    "same_data"}, or None when --model is not from a run) and the lines that say what was chosen and why.
    """
    from gpt2_repro.checkpointing.folders import training_run_of

    budget = f"build-nanogpt's {BUILD_NANOGPT_VAL_TOKENS:,} tokens"
    state, where = training_run_of(args.model) if Path(args.model).is_dir() else (None, "")
    validating = args.data_dir is not None or args.dataset is not None
    if state is None:
        if args.val_tokens is None and validating and where:
            lines = [f"--val_tokens unset: {budget}; the tokens a training run evaluated are not known ({where})."]
        else:
            lines = []
        args.val_tokens = args.val_tokens or BUILD_NANOGPT_VAL_TOKENS
        return None, lines
    data, evals, lines = state["config"]["data"], state["config"]["eval"], []
    if not validating:
        lines.append(_use_run_data(args, data, where))
    same = _is_run_data(args, data, state)
    if same:
        args.seq_len = args.seq_len or data["seq_len"]
        if args.val_tokens is None:
            args.val_tokens = evals["val_tokens"]
            lines.append(
                f"--val_tokens unset: the {args.val_tokens // args.seq_len * args.seq_len:,} tokens the training run "
                f"evaluated, in windows of {args.seq_len} (from {where}; pass --val_tokens for another budget)."
            )
    elif args.val_tokens is None and (args.data_dir is not None or args.dataset is not None):
        lines.append(f"--val_tokens unset: {budget}, since this is not the data the training run evaluated.")
    args.val_tokens = args.val_tokens or BUILD_NANOGPT_VAL_TOKENS
    run_eval = {"val_loss": state.get("val_loss"), "val_step": state.get("val_step"), "seq_len": data["seq_len"]}
    run_eval["val_tokens"] = evals["val_tokens"] // data["seq_len"] * data["seq_len"]
    return run_eval | {"same_data": same}, lines


def _use_run_data(args: EvaluateArgs, data: dict, where: str) -> str:
    """Take the training run's validation data for the unset --data_dir / --dataset; the line saying so, or why
    not."""
    from gpt2_repro.base.errors import NotFound
    from gpt2_repro.data.shards import find_shards

    if data.get("dataset"):
        args.dataset, args.dataset_name = data["dataset"], data.get("dataset_name")
        args.dataset_split, args.text_column = data.get("dataset_split", "train"), data.get("text_column", "text")
        return f"--dataset unset: the training run's stream, {args.dataset} (from {where})."
    try:
        find_shards(data["data_dir"], "val")
    except (NotFound, OSError, TypeError):
        return (
            f"--data_dir unset, and the training run's data ({data.get('data_dir')}, from {where}) is not here: "
            "pass --data_dir to validate."
        )
    args.data_dir = data["data_dir"]
    return f"--data_dir unset: the training run's data, {args.data_dir} (from {where})."


def _is_run_data(args: EvaluateArgs, data: dict, state: dict) -> bool:
    """Whether the data to validate on is the training run's: the same stream, or shards whose training files
    (names and sizes) are the ones its checkpoint records, wherever the folder is now."""
    if args.dataset is not None or data.get("dataset"):
        mine = (args.dataset, args.dataset_name, args.dataset_split, args.text_column)
        return mine == tuple(data.get(k) for k in ("dataset", "dataset_name", "dataset_split", "text_column"))
    if args.data_dir is None:
        return False
    from gpt2_repro.data.shards import find_shards, read_shard

    if data.get("data_dir") and Path(args.data_dir).resolve() == Path(data["data_dir"]).resolve():
        return True
    try:
        files = [[f.name, len(read_shard(f))] for f in find_shards(args.data_dir, "train")]
    except Exception:  # no training shards beside the val ones, or unreadable ones: not provably the run's
        return False
    return bool(state.get("shard_files")) and files == state["shard_files"]


def load_failure(error: Exception) -> str:
    """Why a model could not be loaded, in general terms (the exception's own text names this machine's state)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    cause = error
    while cause is not None:
        if isinstance(cause, LocalEntryNotFoundError):
            return "not in the local cache, and the Hub could not be reached"
        if isinstance(cause, RepositoryNotFoundError):
            return "no such model on the Hub"
        cause = cause.__cause__ or cause.__context__
    return f"loading it failed ({type(error).__name__})"


def _val_source(args: EvaluateArgs) -> dict | None:
    """The validation data's source, as data_prep.py's manifest records it (a stream: its Hub id or file)."""
    from gpt2_repro.data.shards import manifest_source

    if args.dataset is not None:
        return {"dataset": args.dataset, "name": args.dataset_name, "split": args.dataset_split}
    return manifest_source(args.data_dir)


def _val_data_name(args: EvaluateArgs) -> str:
    """The validation data in words, without a local path (the model card's `describe_dataset`)."""
    from gpt2_repro.publishing.cards import describe_dataset

    return describe_dataset(_val_source(args))[0]


def preflight(args: EvaluateArgs, output: Path) -> list[dict] | None:
    """Refuse, before torch is even imported, what would fail later: a model path that is not there or not a model
    folder, weights that cannot be read, a --seq_len past the model's context, a HellaSwag file that is missing or
    malformed, a data folder without val shards, and results (the JSON, the plot, the model card) that cannot be
    written. Returns the examples of the --hellaswag_file named (read here, once), or None."""
    from gpt2_repro.base.errors import EvaluationInputError

    model = Path(args.model).expanduser()
    if model.exists():
        _check_model_folder(args, model)
    elif args.model.startswith(("/", ".", "~")) or args.model.count("/") > 1:  # a path, where a Hub id is org/name
        raise EvaluationInputError(
            f"Could not load a causal LM from {args.model!r}: no such folder. Pass a checkpoint or export folder "
            "(config.json + model.safetensors), or a Hub id."
        )
    examples = None
    if args.hellaswag_file is not None:
        from gpt2_repro.evaluation.hellaswag import load_hellaswag

        if not Path(args.hellaswag_file).is_file():
            raise EvaluationInputError(
                f"--hellaswag_file {args.hellaswag_file}: no such file. Pass the path of hellaswag_val.jsonl, or "
                "leave the option out to download it."
            )
        examples = load_hellaswag(args.hellaswag_file, args.hellaswag_limit)  # a malformed line: its number and the fix
    if args.data_dir is not None:
        from gpt2_repro.data.shards import find_shards

        find_shards(args.data_dir, "val")  # FileNotFoundError naming the folder and the fix
    writes = {"--output": output}
    if args.log_dir is not None or model.is_dir():
        writes["--plot"] = Path(args.plot) if args.plot else output.with_suffix(".png")
    if args.model_card and model.is_dir():
        writes["the model card (or pass --model_card false)"] = model / "README.md"
    for option, path in writes.items():
        problem = _unwritable(path)
        if problem:
            raise EvaluationInputError(f"cannot write {option} {path}: {problem}. Choose another path.")
    return examples


def _check_model_folder(args: EvaluateArgs, model: Path) -> None:
    """A local model folder: its config.json, the safetensors headers, the context --seq_len asks for."""
    from gpt2_repro.base.errors import EvaluationInputError
    from gpt2_repro.checkpointing.folders import safetensors_problem

    if not (model / "config.json").is_file():
        raise EvaluationInputError(
            f"--model {args.model}: no config.json there, so it is not a model folder. Pass a checkpoint or export "
            "folder (config.json + model.safetensors), or a Hub id."
        )
    for weights in sorted(model.glob("model*.safetensors")):
        if problem := safetensors_problem(weights):
            raise EvaluationInputError(
                f"{args.model}: its weights cannot be read ({problem}): {weights.name} is truncated or damaged. "
                "Copy the folder again, or evaluate another checkpoint."
            )
    try:
        config = json.loads((model / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise EvaluationInputError(f"--model {args.model}: config.json cannot be read ({e}).") from e
    context = config.get("n_positions") or config.get("max_position_embeddings")
    if args.seq_len is not None and context and args.seq_len > context:
        raise EvaluationInputError(
            f"seq_len={args.seq_len} is longer than the model's context ({context}): pass seq_len<={context}."
        )


def _unwritable(path: Path) -> str | None:
    """Why a file cannot be written at `path` (its folder is made if missing), or None: tried, not guessed."""
    import tempfile

    from gpt2_repro.base.errors import ENVIRONMENT_ERRNOS

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        return ENVIRONMENT_ERRNOS.get(e.errno) or e.strerror or str(e)
    return None


def _validation_data(args: EvaluateArgs, encoding) -> tuple:
    """(what validation_loss reads: the shards' folder or a stream's first tokens, how many tokens to score): the
    --val_tokens budget, or when the split is smaller all of its whole windows (one line says so; the figure is
    then labelled as not comparable with the published one)."""
    from gpt2_repro.base.errors import EvaluationInputError
    from gpt2_repro.data.windows import val_split
    from gpt2_repro.evaluation.scoring import stream_validation_tokens

    if args.data_dir is None and args.dataset is None:
        return None, None
    data = args.data_dir
    if args.dataset:
        source = (args.dataset, args.dataset_name, args.dataset_split, args.text_column)
        data = stream_validation_tokens(source, encoding, args.val_tokens, args.seq_len)
    shards, where, _ = val_split(data)
    have = sum(len(s) for s in shards)
    whole = min(args.val_tokens, max(0, have - 1)) // args.seq_len * args.seq_len
    if whole < args.seq_len:
        raise EvaluationInputError(f"{where} has {have:,} tokens: not one window of {args.seq_len} + 1 to score.")
    if whole < args.val_tokens // args.seq_len * args.seq_len:
        logger.warning(
            "%s holds %s tokens, fewer than --val_tokens %s needs: evaluating all of it, %s tokens (the figure is not "
            "comparable with the published %s-token one)",
            where,
            f"{have:,}",
            f"{args.val_tokens:,}",
            f"{whole:,}",
            f"{BUILD_NANOGPT_VAL_TOKENS:,}",
        )
    return data, whole


def _hellaswag_examples(args: EvaluateArgs, accelerator) -> list[dict] | None:
    """The HellaSwag examples to score when no file was named: the cached download; None (with a warning) when they
    cannot be had here."""
    from gpt2_repro.base.errors import HellaSwagUnavailable
    from gpt2_repro.evaluation.hellaswag import load_hellaswag

    examples, error = None, None
    with accelerator.main_process_first():  # the main process downloads, the others then read the cache
        try:
            examples = load_hellaswag(None, args.hellaswag_limit)  # a named file was read by preflight
        except HellaSwagUnavailable as e:
            logger.warning("HellaSwag skipped: %s", e)
        except Exception as e:  # raised after the barrier, so no process waits forever
            error = e
    if error is not None:
        raise error
    return examples


def _report(args: EvaluateArgs, results: dict, output: Path) -> None:
    """Print the table; write the JSON, the model card section and the plot (main process only)."""
    from gpt2_repro.base.atomic_io import write_json_atomic
    from gpt2_repro.evaluation.reports import (
        comparison_table,
        find_metrics_log,
        plot_training_curves,
        write_results_to_card,
    )

    is_folder = Path(args.model).is_dir()
    metrics_file = find_metrics_log(args.log_dir, args.model)  # the training run's, when the model folder is in one
    if args.log_dir and metrics_file is None:
        logger.warning("No metrics.jsonl at %s: no training-curve plot.", args.log_dir)
    results["plot"], png = None, None
    if metrics_file is not None:
        png = plot_training_curves(metrics_file, args.plot or output.with_suffix(".png"), results)
        results["plot"] = None if png is None else png.name  # beside the JSON by default; no path of this machine
    write_json_atomic(output, results)  # strict JSON: a NaN loss is written as null
    print("\n" + comparison_table(results))
    for note in results["notes"]:
        print(f"- {note}")
    print(f"\nresults: {output}" + (f"\nplot: {png}" if png else ""))
    if is_folder and args.model_card:
        print(f"model card: {write_results_to_card(args.model, results, _val_source(args))}")


if __name__ == "__main__":
    cli.run(main)
